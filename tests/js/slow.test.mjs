// Close 4008 (slow consumer): the client resumes without a gap or a duplicate.
import assert from "node:assert/strict";
import { once } from "node:events";
import { test } from "node:test";
import { Worker } from "node:worker_threads";

import { connect } from "../../aivad/web/client.js";
import { daemonFor, defer, waitFor } from "./harness.mjs";

test("a slow consumer closed with 4008 resumes from its last seq: no gap, no duplicate", async (t) => {
  // the smallest send buffer the daemon allows, so a blocked reader overflows it soon
  const daemon = await daemonFor(t, { websocket: { send_buffer_frames: 16 } });
  const states = [];
  const client = connect(daemon.url, {
    reconnectInitialMs: 50,
    reconnectMaxMs: 300,
    onStateChange: (state, detail) => states.push({ state, ...detail }),
  });
  defer(t, () => client.close());

  // The first message blocks this thread (Atomics.wait) until the flooding worker has seen the
  // daemon decide on a slow-consumer close: deterministic, whatever the socket buffer sizes are.
  const shared = new SharedArrayBuffer(12);
  const state = new Int32Array(shared);
  const seqs = [];
  const statuses = [];
  const sub = client.subscribe("flood.#", { since: 0, onStatus: (s) => statuses.push(s) }, (envelope) => {
    if (seqs.length === 0) Atomics.wait(state, 0, 0, 120_000);
    seqs.push(envelope.seq);
  });
  await sub.ready;

  const worker = new Worker(new URL("./flood_worker.mjs", import.meta.url), {
    workerData: { controlPath: daemon.controlPath, type: "flood.item", payloadBytes: 65_536, maxMessages: 1500, after: 20, shared },
  });
  await once(worker, "exit");
  assert.equal(state[2], 1, `no 4008 after ${state[1]} messages`);
  t.diagnostic(`4008 after ${state[1] - 20} messages of 64 KiB`);

  const stored = await daemon.allHistory("flood.#", { limit: 100 });
  assert.equal(stored.length, state[1]);
  await waitFor(() => seqs.length >= stored.length, { timeoutMs: 60_000, what: `${stored.length} messages (have ${seqs.length})` });
  assert.deepEqual(seqs, stored.map((m) => m.seq), "every message once, ascending");
  assert.ok(states.some((s) => s.state === "disconnected" && s.code === 4008), JSON.stringify(states));
  assert.ok(statuses.some((s) => s.resumed && s.recovered), JSON.stringify(statuses));
});
