/**
 * Test harness for the browser client: real `aivad serve` processes, each on a
 * free port with its own config, database and control socket.
 *
 * Test policy (the same as tests/conftest.py): no mocks of the daemon; every
 * wait is bounded (`waitFor`, `timeoutMs`) so a hang fails instead of stalling
 * the run, but no test asserts on how fast anything was.
 *
 * Environment, set by tests/test_client_js.py:
 * - AIVAD_PYTHON: the Python that has aivad installed (default: python3);
 * - AIVAD_TMP: a short directory for the daemons' files (unix socket paths
 *   are limited to 107 bytes; default: the OS temp dir).
 */

import { spawn } from "node:child_process";
import { once } from "node:events";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const PYTHON = process.env.AIVAD_PYTHON || "python3";
const TMP_ROOT = process.env.AIVAD_TMP || os.tmpdir();

/** Every daemon started by this process, killed if the process exits early. */
const running = new Set();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

/** A TCP port nobody listens on right now. */
export async function freePort() {
  const server = net.createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = /** @type {net.AddressInfo} */ (server.address());
  server.close();
  await once(server, "close");
  return port;
}

/**
 * Poll `check` until it returns a truthy value (which is returned); fail after `timeoutMs`.
 * @template T
 * @param {() => T | Promise<T>} check
 * @param {{timeoutMs?: number, what?: string, intervalMs?: number}} [options]
 * @returns {Promise<T>}
 */
export async function waitFor(check, { timeoutMs = 30_000, what = "condition", intervalMs = 20 } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/**
 * One request on a unix control socket (JSON lines): its reply.
 * @param {string} socketPath
 * @param {object} request
 * @param {number} [timeoutMs]
 * @returns {Promise<any>}
 */
export function controlRequest(socketPath, request, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    let data = "";
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`control request timed out: ${JSON.stringify(request)}`));
    }, timeoutMs);
    socket.setEncoding("utf8");
    socket.on("connect", () => socket.write(JSON.stringify(request) + "\n"));
    socket.on("data", (chunk) => {
      data += chunk;
      const end = data.indexOf("\n");
      if (end >= 0) {
        clearTimeout(timer);
        socket.end();
        resolve(JSON.parse(data.slice(0, end)));
      }
    });
    socket.on("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
  });
}

/** Enough TOML for test configs: tables of scalars and lists (JSON literals are TOML literals here). */
function toToml(doc) {
  const lines = [];
  for (const [section, values] of Object.entries(doc)) {
    lines.push(`[${section}]`);
    for (const [key, value] of Object.entries(values)) lines.push(`${key} = ${JSON.stringify(value)}`);
  }
  return lines.join("\n") + "\n";
}

/** A real `aivad serve` subprocess with its own directory, port, config and database. */
export class Daemon {
  /**
   * Start a daemon; `sections` are merged into its config, e.g. `{store: {retention_max_messages: 5}}`.
   * @param {Record<string, Record<string, unknown>>} [sections]
   */
  static async start(sections = {}) {
    const daemon = new Daemon(sections, await freePort());
    await daemon.start();
    return daemon;
  }

  /**
   * @param {Record<string, Record<string, unknown>>} sections
   * @param {number} port
   */
  constructor(sections, port) {
    this.dir = mkdtempSync(path.join(TMP_ROOT, "d-"));
    this.port = port;
    this.controlPath = path.join(this.dir, "control.sock");
    this.dbPath = path.join(this.dir, "aivad.db");
    this.logPath = path.join(this.dir, "daemon.log");
    const doc = {
      websocket: { host: "127.0.0.1", port },
      control: { socket: this.controlPath },
      store: { path: this.dbPath, synchronous: "NORMAL" },
      shutdown: { grace_s: 5.0 },
    };
    for (const [name, values] of Object.entries(sections)) doc[name] = { ...(doc[name] ?? {}), ...values };
    this.configPath = path.join(this.dir, "config.toml");
    writeFileSync(this.configPath, toToml(doc));
    /** @type {import("node:child_process").ChildProcess | null} */
    this.proc = null;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/`;
  }

  /** Start (or start again, on the same port and database) and wait until the control socket answers. */
  async start({ timeoutMs = 20_000 } = {}) {
    const logFd = openSync(this.logPath, "a");
    const child = spawn(PYTHON, ["-m", "aivad", "serve", "--config", this.configPath], {
      cwd: this.dir,
      stdio: ["ignore", logFd, logFd],
    });
    closeSync(logFd); // the child has its own copy
    running.add(child);
    this.proc = child;
    const exited = once(child, "exit");
    child.on("exit", () => running.delete(child));
    this.exited = exited;
    await waitFor(async () => {
      if (child.exitCode !== null) throw new Error(`aivad serve exited with ${child.exitCode}:\n${this.log()}`);
      try {
        return (await this.control({ cmd: "status" }, 2000)).ok;
      } catch {
        return false;
      }
    }, { timeoutMs, what: `aivad serve on port ${this.port} to be ready`, intervalMs: 50 });
  }

  /**
   * Signal the daemon and wait for it to exit; returns its exit code (SIGKILL after `timeoutMs`).
   * @param {NodeJS.Signals} [signal]
   */
  async stop(signal = "SIGTERM", { timeoutMs = 15_000 } = {}) {
    const child = this.proc;
    if (!child || child.exitCode !== null || child.signalCode !== null) return child?.exitCode ?? null;
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    const [code] = await this.exited;
    clearTimeout(timer);
    return code;
  }

  /** Delete the database, so the next start() has a new, empty history. */
  wipeStore() {
    for (const suffix of ["", "-wal", "-shm"]) rmSync(this.dbPath + suffix, { force: true });
  }

  /** @param {object} request */
  control(request, timeoutMs = 10_000) {
    return controlRequest(this.controlPath, request, timeoutMs);
  }

  async status() {
    const reply = await this.control({ cmd: "status" });
    return reply.status;
  }

  /** Publish as another agent would, over the control socket; resolves with `{seq, duplicate}`. */
  async publish(type, payload = null, fields = {}) {
    const reply = await this.control({ cmd: "publish", type, payload, ...fields });
    if (!reply.ok) throw new Error(`publish failed: ${JSON.stringify(reply)}`);
    return reply;
  }

  /** Every stored message matching `pattern`, paging through history on the control socket. */
  async allHistory(pattern, { limit = 1000 } = {}) {
    const messages = [];
    let after = 0;
    for (;;) {
      const reply = await this.control({ cmd: "history", pattern, after, limit });
      messages.push(...reply.messages);
      if (reply.messages.length < limit) return messages;
      after = reply.last_seq;
    }
  }

  log() {
    return existsSync(this.logPath) ? readFileSync(this.logPath, "utf8") : "";
  }

  /** Stop and delete the directory. */
  async cleanup() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** @type {WeakMap<object, Array<() => unknown>>} */
const cleanups = new WeakMap();

/**
 * Run `fn` when test `t` ends, last registered first (clients close before their daemon stops).
 * @param {import("node:test").TestContext} t
 * @param {() => unknown} fn
 */
export function defer(t, fn) {
  let stack = cleanups.get(t);
  if (!stack) {
    const fns = (stack = []);
    cleanups.set(t, fns);
    t.after(async () => {
      while (fns.length) await fns.pop()();
    });
  }
  stack.push(fn);
}

/**
 * Start a daemon for one test, stopped and deleted when the test ends; its log is
 * printed when the test failed.
 * @param {import("node:test").TestContext} t
 * @param {Record<string, Record<string, unknown>>} [sections]
 */
export async function daemonFor(t, sections = {}) {
  const daemon = await Daemon.start(sections);
  defer(t, async () => {
    await daemon.stop();
    if (!t.passed) t.diagnostic(`daemon log (${daemon.dir}):\n${daemon.log()}`);
    rmSync(daemon.dir, { recursive: true, force: true });
  });
  return daemon;
}

/**
 * Collects what a subscription hands out, for assertions.
 */
export class Recorder {
  constructor() {
    /** @type {any[]} */
    this.messages = [];
    /** @type {any[]} */
    this.statuses = [];
    this.onMessage = (envelope, info) => {
      this.messages.push({ ...envelope, pattern: info.pattern });
    };
    this.onStatus = (status) => {
      this.statuses.push(status);
    };
  }

  get seqs() {
    return this.messages.map((m) => m.seq);
  }

  /** Wait until `count` messages arrived. */
  until(count, timeoutMs = 30_000) {
    return waitFor(() => this.messages.length >= count, { timeoutMs, what: `${count} messages (have ${this.messages.length})` });
  }
}

/** Assert-free check used by several tests: strictly ascending numbers. */
export function isStrictlyAscending(numbers) {
  return numbers.every((n, i) => i === 0 || n > numbers[i - 1]);
}

/** Collect `onError` reports of a client. */
export function errorLog() {
  /** @type {Error[]} */
  const errors = [];
  return { errors, onError: (error) => errors.push(error) };
}
