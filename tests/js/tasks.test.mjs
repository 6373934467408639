// dispatch / request / collect / taskStatus against a worker written over the raw protocol.
import assert from "node:assert/strict";
import { once } from "node:events";
import { test } from "node:test";

import { AivadError, connect } from "../../aivad/web/client.js";
import { daemonFor, defer } from "./harness.mjs";

/**
 * A tiny worker over the raw WebSocket protocol (DESIGN §4.3): `worker.hello`, then each `task`
 * is answered with `task.result` (js.echo) or a non-retryable `task.fail` (js.fail).
 */
async function startRawWorker(t, url) {
  const ws = new WebSocket(url);
  await once(ws, "open");
  const tasks = [];
  const hello = new Promise((resolve) => {
    ws.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.op === "ok" && frame.ref === "hello") resolve(frame.worker_id);
      if (frame.op !== "task") return;
      const { task_id: taskId, type, payload, attempt } = frame.task;
      tasks.push({ taskId, type, attempt });
      if (type === "js.echo") {
        ws.send(JSON.stringify({ op: "task.result", task_id: taskId, result: { echo: payload } }));
      } else {
        ws.send(JSON.stringify({ op: "task.fail", task_id: taskId, error: "refused by the test worker", retryable: false }));
      }
    };
  });
  ws.send(JSON.stringify({ op: "worker.hello", ref: "hello", types: ["js.echo", "js.fail"], concurrency: 4, name: "js-test" }));
  const workerId = await hello;
  defer(t, () => ws.close());
  return { workerId, tasks };
}

async function rejection(promise) {
  const error = await promise.then(() => assert.fail("expected a rejection"), (e) => e);
  assert.ok(error instanceof AivadError, String(error));
  return error;
}

test("request, dispatch, collect and taskStatus against a worker; errors carry codes", async (t) => {
  const daemon = await daemonFor(t);
  const { workerId, tasks } = await startRawWorker(t, daemon.url);
  assert.equal(typeof workerId, "string");
  const client = connect(daemon.url);
  defer(t, () => client.close());

  assert.deepEqual(await client.request("js.echo", { x: 1 }, { timeout: 10 }), { echo: { x: 1 } });

  const { taskId, duplicate } = await client.dispatch("js.echo", { y: 2 }, {
    priority: "high", retryPolicy: { maxAttempts: 2, backoffFactor: 0.1 }, timeout: 10, affinityKey: "k", groupId: "g-1",
  });
  assert.equal(typeof taskId, "string");
  assert.equal(duplicate, false);
  const collected = await client.collect({ taskIds: [taskId], timeout: 10 });
  assert.deepEqual(collected, { completed: { [taskId]: { echo: { y: 2 } } }, failed: {}, pending: [], reason: "all_done" });
  const status = await client.taskStatus(taskId);
  assert.deepEqual(status, { taskId, type: "js.echo", state: "completed", attempts: 1, result: { echo: { y: 2 } } });
  assert.deepEqual(tasks.map((task) => [task.type, task.attempt]), [["js.echo", 1], ["js.echo", 1]]);

  // a task the worker fails for good, no worker for a type, and bad specs
  assert.equal((await rejection(client.request("js.fail", {}, { timeout: 10 }))).code, "internal");
  assert.equal((await rejection(client.request("nobody.here", {}, { timeout: 0.3 }))).code, "timeout");
  assert.equal((await rejection(client.dispatch("js.echo", {}, { priority: "urgent" }))).code, "bad_request");
  assert.equal((await rejection(client.dispatch("js.echo", {}, { retryPolicy: { maxAttempts: 0 } }))).code, "bad_request");
  assert.equal((await rejection(client.collect({ taskIds: ["nope"], timeout: 1 }))).code, "not_found");
});

test("a request waiting for its result when the connection drops fails with `disconnected`", async (t) => {
  const daemon = await daemonFor(t);
  const client = connect(daemon.url, { reconnectInitialMs: 50, reconnectMaxMs: 300 });
  defer(t, () => client.close());
  await client.ping();
  // nobody works on this type: the request waits in the daemon until the drain closes the connection
  const waiting = rejection(client.request("nobody.works", {}, { timeout: 60 }));
  assert.equal(client.statistics().queued, 0, "sent at once: the client is connected");
  await daemon.stop();
  const error = await waiting;
  assert.equal(error.code, "disconnected");
  assert.match(error.message, /may or may not/);
});
