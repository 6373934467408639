// The browser client against a real daemon: calls, subscriptions, errors, tokens.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";

import { AivadError, connect } from "../../aivad/web/client.js";
import {
  Recorder,
  authSections,
  daemonFor,
  defer,
  errorLog,
  isStrictlyAscending,
  mintToken,
  waitFor,
} from "./harness.mjs";

/** A client closed when the test ends. */
function clientFor(t, url, options = {}) {
  const client = connect(url, { reconnectMaxMs: 500, ...options });
  defer(t, () => client.close());
  return client;
}

/** Resolves with the AivadError `promise` rejects with; fails if it resolves. */
async function rejection(promise) {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof AivadError, `expected an AivadError, got ${error}`);
    return error;
  }
  assert.fail("expected a rejection");
}

test("publish / subscribe round trip, history and de-duplicated publishes", async (t) => {
  const daemon = await daemonFor(t);
  const client = clientFor(t, daemon.url);
  const rec = new Recorder();
  const sub = client.subscribe("chat.#", { onStatus: rec.onStatus }, rec.onMessage);
  const status = await sub.ready;
  assert.equal(status.state, "subscribed");
  assert.equal(status.recovered, true);
  assert.equal(status.resumed, false);
  assert.equal(status.lastSeq, 0);

  const before = Date.now();
  const first = await client.publish("chat.message", { text: "hi" }, { metadata: { source: "test" } });
  assert.equal(first.duplicate, false);
  assert.ok(Number.isInteger(first.seq) && first.seq > 0);
  // a UUIDv7: version 7, variant 10, and its first 48 bits the time it was made, in ms (ids ordered by time)
  assert.match(first.messageId, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  const madeAt = parseInt(first.messageId.replaceAll("-", "").slice(0, 12), 16);
  assert.ok(before <= madeAt && madeAt <= Date.now(), `${before} <= ${madeAt}`);
  const again = await client.publish("chat.message", { text: "hi" }, { messageId: first.messageId });
  assert.deepEqual([again.seq, again.duplicate], [first.seq, true]);
  await client.publish("chat.other", null);
  await client.publish("elsewhere.x", 1);

  await rec.until(2);
  assert.deepEqual(rec.messages.map((m) => [m.type, m.pattern]), [["chat.message", "chat.#"], ["chat.other", "chat.#"]]);
  assert.deepEqual(rec.messages[0].payload, { text: "hi" });
  assert.deepEqual(rec.messages[0].metadata, { source: "test" });
  assert.equal(rec.messages[1].payload, null);
  assert.equal(sub.lastSeq, rec.messages[1].seq);

  const page = await client.history("chat.#", { after: 0, limit: 1 });
  assert.equal(page.messages.length, 1);
  assert.equal(page.lastSeq, first.seq);
  const rest = await client.history("chat.#", { after: page.lastSeq });
  assert.deepEqual(rest.messages.map((m) => m.type), ["chat.other"]);
  const none = await client.history("nothing.here", { after: 40 });
  assert.deepEqual(none, { messages: [], lastSeq: 40 });
  assert.ok((await client.ping()) >= 0);
});

test("since replays stored messages first; overlapping subscriptions each get theirs", async (t) => {
  const daemon = await daemonFor(t);
  for (let n = 1; n <= 5; n++) await daemon.publish("feed.item", { n });
  const client = clientFor(t, daemon.url);
  const all = new Recorder();
  const items = new Recorder();
  client.subscribe("#", { since: 2 }, all.onMessage);
  client.subscribe("feed.*", { since: 0 }, items.onMessage);
  await all.until(3);
  await items.until(5);
  await client.publish("feed.item", { n: 6 });
  await all.until(4);
  await items.until(6);
  assert.deepEqual(all.messages.map((m) => m.payload.n), [3, 4, 5, 6]);
  assert.deepEqual(items.messages.map((m) => m.payload.n), [1, 2, 3, 4, 5, 6]);
  assert.ok(isStrictlyAscending(items.seqs));
});

test("one subscription per pattern per client; close stops it and frees the pattern", async (t) => {
  const daemon = await daemonFor(t);
  const client = clientFor(t, daemon.url);
  const first = new Recorder();
  const sub = client.subscribe("dup.#", { onStatus: first.onStatus }, first.onMessage);
  assert.throws(() => client.subscribe("dup.#", () => {}), (error) => error instanceof AivadError && error.code === "bad_request");
  await sub.ready;
  await client.publish("dup.a", 1);
  await first.until(1);
  sub.close();
  assert.equal(sub.closed, true);
  assert.equal(first.statuses.at(-1).state, "ended");
  assert.equal(first.statuses.at(-1).reason, "closed");

  const second = new Recorder();
  const again = client.subscribe("dup.#", { since: 0 }, second.onMessage);
  await again.ready;
  await client.publish("dup.b", 2);
  await second.until(2);
  assert.deepEqual(second.messages.map((m) => m.payload), [1, 2]);
  assert.equal(first.messages.length, 1, "a closed subscription hands out nothing more");
});

test("errors carry the daemon's codes; bad input fails at once", async (t) => {
  const daemon = await daemonFor(t);
  const client = clientFor(t, daemon.url, { maxFrameBytes: 4096 });
  assert.equal((await rejection(client.publish("bad topic!", 1))).code, "bad_request");
  assert.equal((await rejection(client.publish("a.b", 1, { metadata: [1] }))).code, "bad_request");
  assert.equal((await rejection(client.publish("a.b", 1, { messageId: "" }))).code, "bad_request");
  assert.equal((await rejection(client.history("a..b"))).code, "bad_request");
  assert.equal((await rejection(client.history("a.#", { after: -1 }))).code, "bad_request");
  assert.throws(() => client.subscribe("a.#", { since: -1 }, () => {}), /since/);
  assert.throws(() => client.subscribe("a b", () => {}), (error) => error.code === "bad_request");
  const cyclic = {};
  cyclic.self = cyclic;
  assert.equal((await rejection(client.publish("a.b", cyclic))).code, "bad_request");
  assert.equal((await rejection(client.publish("a.b", 10n))).code, "bad_request");
  // too large for maxFrameBytes: refused before sending, the connection stays up
  assert.equal((await rejection(client.publish("a.b", "x".repeat(5000)))).code, "too_large");
  // the daemon's own checks come back with its codes
  assert.equal((await rejection(client.history("a.#", { limit: 5000 }))).code, "bad_request");
  assert.equal((await rejection(client.taskStatus("no-such-task"))).code, "not_found");
  const published = await client.publish("a.b", "still connected");
  assert.ok(published.seq > 0);
  assert.equal(client.statistics().connections, 1);
  assert.throws(() => connect("not a url"), (error) => error.code === "bad_request");
  assert.throws(() => connect("ftp://x/"), (error) => error.code === "bad_request");
});

test("a frame over the daemon's limit (close 1009) fails that call with too_large; the others are sent again", async (t) => {
  const daemon = await daemonFor(t, { websocket: { max_frame_bytes: 1024 } });
  const states = [];
  const client = clientFor(t, daemon.url, { onStateChange: (state, detail) => states.push({ state, ...detail }) });
  await client.ping();
  const big = client.publish("big.x", "x".repeat(2000)).catch((e) => e);
  const small = client.publish("big.x", "small");
  assert.equal((await big).code, "too_large");
  assert.ok((await small).seq > 0);
  assert.ok(states.some((s) => s.state === "disconnected" && s.code === 1009), JSON.stringify(states));
  const stored = await daemon.allHistory("big.#");
  assert.deepEqual(stored.map((m) => m.payload), ["small"]);
});

test("a subscribe answered with `overloaded` is tried again until it succeeds", async (t) => {
  const daemon = await daemonFor(t, { websocket: { max_subscriptions: 1 } });
  const client = clientFor(t, daemon.url);
  const one = client.subscribe("one.#", () => {});
  await one.ready;
  const rec = new Recorder();
  const two = client.subscribe("two.#", { since: 0, onStatus: rec.onStatus }, rec.onMessage);
  await waitFor(() => two.statistics().subscribes >= 2, { what: "a retried subscribe" });
  assert.equal(two.status, null, "not subscribed while the daemon refuses");
  one.close(); // frees the daemon's only slot on this connection
  const status = await two.ready;
  assert.equal(status.state, "subscribed");
  await client.publish("two.x", 1);
  await rec.until(1);
});

test("close() fails waiting calls with `closed` and ends subscriptions", async (t) => {
  const daemon = await daemonFor(t);
  await daemon.stop();
  const client = connect(daemon.url, { reconnectMaxMs: 200 });
  const rec = new Recorder();
  const sub = client.subscribe("x.#", { onStatus: rec.onStatus }, rec.onMessage);
  const pending = rejection(client.publish("x.y", 1));
  await client.close();
  assert.equal((await pending).code, "closed");
  assert.equal((await rejection(sub.ready)).code, "closed");
  assert.equal(client.state, "closed");
  assert.equal((await rejection(client.publish("x.y", 2))).code, "closed");
  assert.throws(() => client.subscribe("z.#", () => {}), (error) => error.code === "closed");
});

test("without a token no auth frame is sent; with one, auth is the first frame and the daemon's answer counts", async (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), "tok-"));
  defer(t, () => rmSync(dir, { recursive: true, force: true }));
  const daemon = await daemonFor(t, authSections(dir, false));
  /** A real WebSocket that records what it sends: it also shows the `WebSocket` option works. */
  const sent = [];
  class RecordingWebSocket extends WebSocket {
    send(data) {
      sent.push(JSON.parse(data));
      super.send(data);
    }
  }
  const anonymous = clientFor(t, daemon.url, { WebSocket: RecordingWebSocket });
  await anonymous.publish("anon.x", 1);
  assert.ok(sent.length > 0 && sent.every((frame) => frame.op !== "auth"), JSON.stringify(sent));
  assert.equal((await daemon.status()).websocket.errors_sent, 0);

  // DESIGN §4.8: with a token, `auth` goes first and its rights apply (required = false keeps anonymous in)
  sent.length = 0;
  const { errors, onError } = errorLog();
  let asked = 0;
  const token = mintToken("ui-1", { subscribe: ["anon.#"], publish: ["anon.*"] });
  const withToken = clientFor(t, daemon.url, {
    WebSocket: RecordingWebSocket,
    token: async () => (++asked, token),
    onError,
  });
  const rec = new Recorder();
  await withToken.subscribe("anon.#", { since: 0 }, rec.onMessage).ready;
  await withToken.publish("anon.y", 2);
  await rec.until(2);
  assert.equal(sent[0].op, "auth");
  assert.deepEqual(sent.filter((frame) => frame.op === "auth").map((frame) => frame.token), [token]);
  await assert.rejects(withToken.publish("other.z", 3), (error) => error.code === "forbidden");
  assert.deepEqual(errors, []);
  assert.equal(withToken.statistics().connections, 1);
});

test("a throwing onMessage is reported and does not stop the subscription", async (t) => {
  const daemon = await daemonFor(t);
  const { errors, onError } = errorLog();
  const client = clientFor(t, daemon.url, { onError });
  const seen = [];
  const sub = client.subscribe("boom.#", (envelope) => {
    seen.push(envelope.payload);
    if (envelope.payload === 1) throw new Error("handler bug");
  });
  await sub.ready;
  await client.publish("boom.a", 1);
  await client.publish("boom.a", 2);
  await waitFor(() => seen.length === 2, { what: "both messages" });
  assert.deepEqual(seen, [1, 2]);
  assert.deepEqual(errors.map((e) => e.message), ["handler bug"]);
});

test("tokens: a failing token function is reported and asked again; auth is the first frame of every connection", async (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), "tok-"));
  defer(t, () => rmSync(dir, { recursive: true, force: true }));
  const daemon = await daemonFor(t, authSections(dir, true));
  const sockets = [];
  class RecordingWebSocket extends WebSocket {
    constructor(url) {
      super(url);
      this.sent = [];
      sockets.push(this);
    }
    send(data) {
      this.sent.push(JSON.parse(data));
      super.send(data);
    }
  }
  const { errors, onError } = errorLog();
  let asked = 0;
  const token = mintToken("agent-7", { subscribe: ["tok.#"], publish: ["tok.*"] });
  const client = clientFor(t, daemon.url, {
    WebSocket: RecordingWebSocket,
    reconnectInitialMs: 20,
    onError,
    token: () => {
      asked++;
      if (asked === 1) throw new Error("login service down");
      return Promise.resolve(token);
    },
  });
  const rec = new Recorder();
  await client.subscribe("tok.#", { since: 0, onStatus: rec.onStatus }, rec.onMessage).ready;
  assert.equal(errors[0].code, "unauthorized");
  assert.match(errors[0].message, /login service down/);
  assert.equal(sockets.length, 1, "no socket is opened without a token");

  await client.publish("tok.a", 1);
  await daemon.stop();
  await daemon.start();
  await client.publish("tok.b", 2);
  await rec.until(2);
  assert.ok(sockets.length >= 2);
  for (const ws of sockets) {
    if (ws.sent.length) assert.deepEqual(ws.sent[0], { op: "auth", token, ref: ws.sent[0].ref });
  }
  assert.equal(asked, 2, "the token is reused across reconnects until it expires or is refused");
});
