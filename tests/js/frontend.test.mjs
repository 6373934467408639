// docs/frontend.md, executed: its Python agent publishes, its EventFeed follows, reloads and starts over.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { pathToFileURL } from "node:url";
import { promisify } from "node:util";

import { PYTHON, REPO, daemonFor, defer, waitFor } from "./harness.mjs";

const DOC = readFileSync(path.join(REPO, "docs", "frontend.md"), "utf8");
const DOC_WS_URL = "ws://127.0.0.1:8765/";
const DOC_CLIENT_URL = "http://127.0.0.1:8766/client.js";
const CLIENT = pathToFileURL(path.join(REPO, "aivad", "web", "client.js")).href;

/** The fenced block after `<!-- test: name -->` in docs/frontend.md. */
function docBlock(name) {
  const match = new RegExp(`<!-- test: ${name} -->\\n\`\`\`\\w+\\n([\\s\\S]*?)\\n\`\`\``).exec(DOC);
  assert.ok(match, `docs/frontend.md has no block marked ${name}`);
  return match[1];
}

/** `text` with `from` replaced exactly once. */
function replaceOnce(text, from, to) {
  assert.equal(text.split(from).length, 2, `expected ${from} once`);
  return text.replace(from, to);
}

/** sessionStorage's interface, in memory: survives a "reload" of the feed, as sessionStorage does. */
class MemoryStorage {
  #items = new Map();
  getItem(key) {
    return this.#items.has(key) ? this.#items.get(key) : null;
  }
  setItem(key, value) {
    this.#items.set(key, String(value));
  }
  removeItem(key) {
    this.#items.delete(key);
  }
}

test("docs/frontend.md: agent publishes, the page follows, reloads, and starts over with a new history", async (t) => {
  const dir = mkdtempSync(path.join(process.env.AIVAD_TMP || "/tmp", "doc-"));
  defer(t, () => rmSync(dir, { recursive: true, force: true }));
  const feedPath = path.join(dir, "feed.mjs");
  writeFileSync(feedPath, replaceOnce(docBlock("frontend-feed"), `"${DOC_CLIENT_URL}"`, JSON.stringify(CLIENT)));
  const { EventFeed } = await import(pathToFileURL(feedPath).href);

  const daemon = await daemonFor(t);
  const agent = replaceOnce(docBlock("frontend-agent"), DOC_WS_URL, daemon.url);
  const runAgent = () => promisify(execFile)(PYTHON, ["-c", agent], { timeout: 60_000 });
  const pattern = "notifications.frontend.evt-42.#";
  const storedSeqs = async () => (await daemon.allHistory(pattern)).map((m) => m.seq);

  // first visit: the older messages come from history, then live ones
  await runAgent();
  const storage = new MemoryStorage();
  let renders = 0;
  const page = new EventFeed({ url: daemon.url, eventId: "evt-42", storage, onChange: () => renders++ });
  await page.start();
  assert.equal(page.messages.length, 2);
  await daemon.publish("notifications.frontend.evt-43.finding", { text: "another event" });
  await runAgent();
  await waitFor(() => page.messages.length === 4, { what: "4 messages on the page" });
  assert.deepEqual(page.messages.map((m) => m.seq), await storedSeqs());
  assert.ok(page.messages.every((m) => m.type === "notifications.frontend.evt-42.finding" && m.metadata.source === "scanner"));
  assert.ok(renders > 0);
  await page.close();

  // published while the page was away; then a reload restores what it kept and resumes
  await runAgent();
  const reloaded = new EventFeed({ url: daemon.url, eventId: "evt-42", storage, onChange: () => {} });
  assert.equal(reloaded.messages.length, 4, "restored from storage before any network");
  await reloaded.start();
  await waitFor(() => reloaded.messages.length === 6, { what: "6 messages after the reload" });
  assert.deepEqual(reloaded.messages.map((m) => m.seq), await storedSeqs(), "each once, in order");
  assert.equal(reloaded.notice, null);

  // the daemon comes back with a new, empty store: the page starts over with the new history
  await daemon.stop();
  daemon.wipeStore();
  await daemon.start();
  await waitFor(() => reloaded.notice?.includes("reset"), { what: "the reset notice" });
  await runAgent();
  await waitFor(() => reloaded.messages.length === 2, { what: "the new history" });
  assert.deepEqual(reloaded.messages.map((m) => m.seq), [1, 2]);
  await reloaded.close();
});

test("docs/frontend.md: the page's module script parses", async (t) => {
  const html = DOC.match(/```html\n([\s\S]*?)\n```/)[1];
  const script = html.match(/<script type="module">([\s\S]*?)<\/script>/)[1];
  const dir = mkdtempSync(path.join(process.env.AIVAD_TMP || "/tmp", "doc-"));
  defer(t, () => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, "page.mjs");
  writeFileSync(file, script);
  await promisify(execFile)(process.execPath, ["--check", file]);
});
