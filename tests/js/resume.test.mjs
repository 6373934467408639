// Reconnect and resume against real daemons that stop, restart, lose their store and trim it.
import assert from "node:assert/strict";
import { test } from "node:test";

import { AivadError, connect } from "../../aivad/web/client.js";
import { Recorder, daemonFor, defer, waitFor } from "./harness.mjs";

/** A client with a short reconnect cap (tests wait for reconnects), closed when the test ends. */
function clientFor(t, url, options = {}) {
  const client = connect(url, { reconnectInitialMs: 50, reconnectMaxMs: 300, ...options });
  defer(t, () => client.close());
  return client;
}

/** Record every connection state change of a client. */
function stateLog() {
  const states = [];
  return { states, onStateChange: (state, detail) => states.push({ state, ...detail }) };
}

const range = (n, from = 0) => Array.from({ length: n }, (_, i) => from + i);

test("resume across a daemon restart (SIGTERM → 1001): every message once, in order, as history has them", async (t) => {
  const daemon = await daemonFor(t);
  const log = stateLog();
  const consumer = clientFor(t, daemon.url, { onStateChange: log.onStateChange });
  const rec = new Recorder();
  const sub = consumer.subscribe("restart.#", { since: 0, onStatus: rec.onStatus }, rec.onMessage);
  await sub.ready;

  // A producer publishes one message after the other while the daemon goes away and comes back:
  // publishes whose reply was lost in the drain are sent again with their message_id.
  const producer = clientFor(t, daemon.url);
  const TOTAL = 300;
  let published = 0;
  const producing = (async () => {
    for (const n of range(TOTAL)) {
      await producer.publish("restart.tick", { n }, { timeoutMs: 120_000 });
      published++;
    }
  })();
  await waitFor(() => published >= 50, { what: "50 publishes" });
  assert.equal(await daemon.stop("SIGTERM"), 0);
  await waitFor(() => log.states.some((s) => s.state === "disconnected" && s.code === 1001), { what: "a 1001 close" });
  const publishedWhileUp = published;
  await daemon.start();
  await producing;
  assert.ok(publishedWhileUp < TOTAL, "some publishes waited for the restart");

  const history = await daemon.allHistory("restart.#");
  assert.deepEqual(history.map((m) => m.payload.n), range(TOTAL), "each publish stored once, in order");
  await rec.until(TOTAL);
  assert.deepEqual(rec.seqs, history.map((m) => m.seq), "no gap, no duplicate, ascending");
  assert.equal(sub.lastSeq, history.at(-1).seq);
  const resumed = rec.statuses.filter((s) => s.resumed);
  assert.ok(resumed.length >= 1 && resumed.every((s) => s.recovered && !s.epochChanged), JSON.stringify(rec.statuses));
  assert.ok(consumer.statistics().connections >= 2);
});

test("publishes made while the daemon is down wait in a bounded queue and are stored once", async (t) => {
  const daemon = await daemonFor(t);
  const client = clientFor(t, daemon.url, { maxQueued: 5 });
  const rec = new Recorder();
  await client.subscribe("queued.#", { since: 0 }, rec.onMessage).ready;
  await daemon.stop();
  await waitFor(() => client.state === "disconnected", { what: "the client to notice" });

  const queued = range(5, 1).map((n) => client.publish("queued.item", { n }, { messageId: `q-${n}`, timeoutMs: 60_000 }));
  const beyond = await client.publish("queued.item", { n: 6 }).catch((error) => error);
  assert.ok(beyond instanceof AivadError && beyond.code === "overloaded", String(beyond));
  assert.equal(client.statistics().queued, 5);

  await daemon.start();
  const results = await Promise.all(queued);
  assert.ok(results.every((r) => !r.duplicate));
  assert.deepEqual(results.map((r) => r.messageId), range(5, 1).map((n) => `q-${n}`));
  assert.ok(results.every((r, i) => i === 0 || r.seq > results[i - 1].seq), "sent in call order");

  const history = await daemon.allHistory("queued.#");
  assert.deepEqual(history.map((m) => m.message_id), ["q-1", "q-2", "q-3", "q-4", "q-5"]);
  await rec.until(5);
  assert.deepEqual(rec.seqs, history.map((m) => m.seq));
  await client.publish("queued.item", { n: 7 }); // room again
});

test("a re-created store (another history) is reported as epochChanged, and its messages arrive from seq 1", async (t) => {
  const daemon = await daemonFor(t);
  for (const n of range(10)) await daemon.publish("epoch.item", { n });
  const client = clientFor(t, daemon.url);
  const rec = new Recorder();
  const sub = client.subscribe("epoch.#", { since: 0, onStatus: rec.onStatus }, rec.onMessage);
  await rec.until(10);
  assert.equal(sub.lastSeq, 10);

  await daemon.stop();
  daemon.wipeStore();
  await daemon.start();
  const changed = await waitFor(() => rec.statuses.find((s) => s.resumed), { what: "the resume status" });
  assert.equal(changed.recovered, false);
  assert.equal(changed.epochChanged, true);
  assert.equal(changed.lastSeq, 0, "the client starts over with the new history");
  assert.equal(sub.statistics().subscribes, 2, "the daemon replays the new history: no second subscribe");

  for (const n of range(3, 100)) await daemon.publish("epoch.item", { n });
  await rec.until(13);
  assert.deepEqual(rec.messages.slice(10).map((m) => [m.seq, m.payload.n]), [[1, 100], [2, 101], [3, 102]]);
});

test("a since that retention overtook reports recovered:false with the gap, then replays what is kept", async (t) => {
  const daemon = await daemonFor(t, { store: { retention_max_messages: 5, retention_interval_s: 0.1 } });
  for (const n of range(30, 1)) await daemon.publish("kept.item", { n });
  const floor = await waitFor(async () => {
    const { store } = await daemon.status();
    return store.retention_floor >= 25 && store.retention_floor;
  }, { what: "retention to run" });

  const client = clientFor(t, daemon.url);
  const rec = new Recorder();
  const sub = client.subscribe("kept.#", { since: 3, onStatus: rec.onStatus }, rec.onMessage);
  const status = await sub.ready;
  assert.equal(status.recovered, false);
  assert.deepEqual(status.gap, [4, floor]);
  assert.equal(status.epochChanged, false);
  const kept = await daemon.allHistory("kept.#");
  await rec.until(kept.length);
  assert.deepEqual(rec.seqs, kept.map((m) => m.seq));
  assert.ok(rec.seqs[0] > floor);
});

test("a frozen daemon (SIGSTOP): keepalive gives the silent connection up, the client resumes after SIGCONT", async (t) => {
  const daemon = await daemonFor(t);
  const log = stateLog();
  const client = clientFor(t, daemon.url, { keepaliveMs: 200, connectTimeoutMs: 500, onStateChange: log.onStateChange });
  const rec = new Recorder();
  await client.subscribe("frozen.#", { since: 0, onStatus: rec.onStatus }, rec.onMessage).ready;
  await daemon.publish("frozen.x", 1);
  await rec.until(1);

  daemon.proc.kill("SIGSTOP");
  defer(t, () => daemon.proc.kill("SIGCONT")); // whatever happens, let the cleanup's SIGTERM work
  await waitFor(() => log.states.some((s) => s.reason === "no answer to a keepalive ping"), { what: "the keepalive to give up" });
  const timedOut = await client.publish("frozen.x", 2, { messageId: "during-freeze", timeoutMs: 300 }).catch((e) => e);
  assert.equal(timedOut.code, "timeout");
  assert.equal(client.statistics().unanswered, 0, "a timed-out call is forgotten");

  daemon.proc.kill("SIGCONT");
  await waitFor(() => client.state === "open", { what: "the client to reconnect" });
  await client.publish("frozen.x", 3);
  const stored = await daemon.allHistory("frozen.#");
  await rec.until(stored.length);
  assert.deepEqual(rec.seqs, stored.map((m) => m.seq));
});
