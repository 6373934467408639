// A worker thread that floods a daemon with large messages over its control socket until the
// daemon reports a slow-consumer close (4008), then wakes the blocked main thread.
//
// workerData: {controlPath, type, payloadBytes, maxMessages, after, shared}; shared is an
// Int32Array over a SharedArrayBuffer: [0] wake flag, [1] messages published, [2] 1 if a 4008 was seen.
import { once } from "node:events";
import net from "node:net";
import { workerData } from "node:worker_threads";

const { controlPath, type, payloadBytes, maxMessages, after, shared } = workerData;
const state = new Int32Array(shared);

const socket = net.connect(controlPath);
socket.setEncoding("utf8");
await once(socket, "connect");
let buffer = "";
const waiters = [];
socket.on("data", (chunk) => {
  buffer += chunk;
  for (let end = buffer.indexOf("\n"); end >= 0; end = buffer.indexOf("\n")) {
    const line = buffer.slice(0, end);
    buffer = buffer.slice(end + 1);
    waiters.shift()(JSON.parse(line));
  }
});
/** Requests on one control connection are answered in order. */
function request(body) {
  return new Promise((resolve) => {
    waiters.push(resolve);
    socket.write(JSON.stringify(body) + "\n");
  });
}

const pad = "x".repeat(payloadBytes);
let published = 0;
async function publishBatch(count) {
  const replies = [];
  for (let i = 0; i < count; i++) replies.push(request({ cmd: "publish", type, payload: { n: published++, pad } }));
  for (const reply of await Promise.all(replies)) if (!reply.ok) throw new Error(JSON.stringify(reply));
}

try {
  while (published < maxMessages) {
    await publishBatch(10);
    const { status } = await request({ cmd: "status" });
    if (status.websocket.slow_consumer_closes >= 1) {
      Atomics.store(state, 2, 1);
      break;
    }
  }
  await publishBatch(after); // live messages after the close: the resume must bring them too
} finally {
  Atomics.store(state, 1, published);
  Atomics.store(state, 0, 1);
  Atomics.notify(state, 0);
  socket.end();
}
