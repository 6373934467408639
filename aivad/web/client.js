// @ts-check
/**
 * aivad browser client — one dependency-free ES module, no build step.
 *
 * Runs in browsers and in Node 20+ (Node 20: `node --experimental-websocket`,
 * or pass any WHATWG-compatible implementation as `connect(url, {WebSocket})`).
 * The daemon serves it at `GET /client.js`; docs/frontend.md is the guide,
 * docs/protocol.md the wire protocol it speaks (DESIGN §4.3, §4.9).
 *
 * ```js
 * import { connect } from "/client.js";
 * const client = connect("ws://127.0.0.1:8765/", { token: () => fetchToken() });
 * const sub = client.subscribe("notifications.frontend.evt-42.#", { since: 0 },
 *   (envelope, { pattern }) => render(envelope));
 * const { seq } = await client.publish("chat.message", { text: "hi" });
 * ```
 *
 * How it is built, and why:
 *
 * - **One connection per client**, multiplexing every subscription and call.
 *   Browsers limit connections per host, and the daemon's answer to a slow
 *   reader (close 4008) then costs every subscription a resume, which is
 *   cheap: the store is the buffer. It reconnects after ANY close (1001
 *   drain, 4008 slow consumer, 4001 token expired, a reset, a restarted
 *   daemon) with capped exponential backoff and jitter.
 * - **Resume by seq and epoch.** Each subscription remembers the last `seq` it
 *   handed out and the history's `epoch`, re-subscribes with both after a
 *   reconnect, and drops anything at or below that seq, so `onMessage` never
 *   sees a seq twice and sees them ascending. What the daemon says about the
 *   resume (`recovered`, `gap`, `epoch_changed`) reaches `onStatus`.
 * - **Pipelined calls.** Every request carries a fresh `ref`; replies are
 *   matched by it. Calls made while disconnected wait in a bounded queue
 *   (`maxQueued`, else `overloaded` at once) and are sent on the next
 *   connection. Calls safe to repeat (`publish`, which always carries a
 *   `message_id`, `history`, `taskStatus`, `collect`, `ping`) are sent again
 *   when a connection drops before their reply; `dispatch` and `request`
 *   are not (the daemon may have acted on them) and fail with `disconnected`.
 * - **Tokens** are sent as the first frame (`auth`) because browsers cannot
 *   set headers on a WebSocket handshake; they are refreshed before the
 *   `expires_at` the daemon reports.
 *
 * @module aivad/client
 */

/* ------------------------------------------------------------------ types */

/**
 * A stored message (DESIGN §2). Field names are fixed.
 * @typedef {object} Envelope
 * @property {string} message_id  The producer's idempotency key.
 * @property {string} timestamp    RFC 3339 UTC, set by the daemon.
 * @property {string} type         The topic, e.g. `notifications.frontend.evt-42.chat`.
 * @property {unknown} payload     Any JSON value.
 * @property {Record<string, unknown>} metadata
 * @property {number} seq          Set by the store; strictly increasing, the resume point.
 */

/**
 * The second argument of `onMessage`.
 * @typedef {object} MessageInfo
 * @property {string} pattern  The subscribed pattern that matched.
 */

/**
 * @callback MessageHandler
 * @param {Envelope} envelope
 * @param {MessageInfo} info
 * @returns {void}
 */

/**
 * What a subscription learnt from the daemon: after each (re)subscribe
 * (`state: "subscribed"`), and once when it ends (`state: "ended"`).
 *
 * A front end reloads its view when `recovered` is false: with `epochChanged`
 * the seqs it holds belong to another history (clear them all); with a `gap`
 * the messages in that seq range can no longer be replayed.
 *
 * @typedef {object} SubscriptionStatus
 * @property {"subscribed" | "ended"} state
 * @property {boolean} recovered  False when part of what the resume asked for is gone.
 * @property {[number, number] | null} gap  The seq range retention dropped (inclusive), if any.
 * @property {string | null} epoch  The history's epoch; keep it beside `lastSeq` to resume later.
 * @property {boolean} epochChanged  The daemon's history is not the one `since` referred to
 *   (another epoch, or `since` above its newest seq): the replay starts at its oldest message.
 * @property {number | null} lastSeq  The resume point: the last seq handed out, or where the
 *   subscription started. Null only before the first reply.
 * @property {boolean} resumed  True for every subscribe after the first (after a reconnect).
 * @property {string} [reason]  When ended: `closed` (by you or the client), the daemon's
 *   `unsubscribed` reason (e.g. `forbidden`), or the error code that refused the subscribe.
 * @property {AivadError} [error]  When ended by a refused subscribe.
 */

/**
 * @typedef {object} SubscribeOptions
 * @property {number | null} [since]  Replay stored messages with seq > since first. Absent:
 *   only messages stored after the subscription starts.
 * @property {string | null} [epoch]  The epoch `since` belongs to (from an earlier status).
 * @property {(status: SubscriptionStatus) => void} [onStatus]
 */

/**
 * A token, or a function (sync or async) returning one. A function is asked
 * again before the token expires, after close 4001 and after a refused `auth`.
 * @typedef {string | (() => string | Promise<string>)} TokenSource
 */

/**
 * @typedef {"connecting" | "open" | "disconnected" | "closed"} ConnectionState
 */

/**
 * @typedef {object} StateDetail
 * @property {number} [code]       The close code, for `disconnected`.
 * @property {string} [reason]     Why, for `disconnected`.
 * @property {number} [retryInMs]  When the next attempt starts, for `disconnected`.
 * @property {number} [attempt]    Consecutive attempts so far, for `connecting`.
 */

/**
 * Options of {@link connect}. Every queue has a bound here; times are in ms.
 * @typedef {object} ConnectOptions
 * @property {TokenSource} [token]  Without one (or with "") no `auth` frame is sent.
 * @property {WebSocketConstructor} [WebSocket]  For environments without a global WebSocket.
 * @property {number} [maxQueued=1000]  Calls not yet answered (waiting for a connection, a
 *   reply or a retry); one more is rejected with `overloaded` at once.
 * @property {number} [requestTimeoutMs=30000]  Default bound on one call, from the call until
 *   its reply, reconnects and queueing included. `Infinity`: no bound.
 * @property {number} [connectTimeoutMs=10000]  A handshake not done by then is abandoned.
 * @property {number} [reconnectInitialMs=250]  First reconnect delay; doubles per failed attempt.
 * @property {number} [reconnectMaxMs=30000]  Cap of the reconnect delay (jitter: 50..100 %).
 * @property {number} [keepaliveMs=20000]  After this long without a frame, ping; with no frame
 *   for another such period, give the connection up and reconnect.
 * @property {number} [maxFrameBytes=1048576]  Largest frame sent (the daemon's default limit);
 *   a larger call fails with `too_large` instead of the daemon closing with 1009.
 * @property {number} [refreshBeforeMs=60000]  Refresh the token this long before it expires
 *   (at most half its remaining lifetime).
 * @property {number} [closeTimeoutMs=5000]  `close()` waits this long for the closing handshake.
 * @property {(state: ConnectionState, detail: StateDetail) => void} [onStateChange]
 * @property {(error: Error) => void} [onError]  Problems that belong to no call: a refused
 *   token, a throwing token function or handler, an error frame without a waiting call.
 *   Default: `console.warn`.
 */

/**
 * The part of the WHATWG WebSocket this client uses.
 * @typedef {object} WebSocketLike
 * @property {number} readyState
 * @property {(data: string) => void} send
 * @property {(code?: number, reason?: string) => void} close
 * @property {((event: any) => void) | null} onopen
 * @property {((event: {data: unknown}) => void) | null} onmessage
 * @property {((event: {code: number, reason: string}) => void) | null} onclose
 * @property {((event: any) => void) | null} onerror
 */

/** @typedef {new (url: string) => WebSocketLike} WebSocketConstructor */

/**
 * @typedef {object} PublishOptions
 * @property {string} [messageId]  Idempotency key (1..255 characters); generated when absent.
 * @property {Record<string, unknown>} [metadata]
 * @property {number} [timeoutMs]  Overrides `requestTimeoutMs` for this call.
 */

/**
 * @typedef {object} Published
 * @property {number} seq
 * @property {boolean} duplicate  The daemon had this `messageId` already. A retry the client
 *   made itself of a generated id never counts as a duplicate.
 * @property {string} messageId
 */

/**
 * @typedef {object} HistoryOptions
 * @property {number} [after=0]
 * @property {number} [limit=100]  1..1000.
 * @property {number} [timeoutMs]
 */

/**
 * @typedef {object} HistoryPage
 * @property {Envelope[]} messages  Ascending seq.
 * @property {number} lastSeq  Ask for the next page with `after: lastSeq`.
 */

/**
 * @typedef {object} RetryPolicy
 * @property {number} [maxAttempts]
 * @property {number} [backoffFactor]  Seconds.
 * @property {number} [maxBackoff]     Seconds.
 */

/**
 * Options of a task (DESIGN §4.3 `dispatch`); the daemon's units: seconds.
 * @typedef {object} DispatchOptions
 * @property {"low" | "normal" | "high" | "critical" | number} [priority]
 * @property {RetryPolicy} [retryPolicy]
 * @property {number} [timeout]    Seconds per attempt.
 * @property {number} [heartbeat]  Longest silence (s) allowed between progress frames.
 * @property {string} [affinityKey]
 * @property {string} [groupId]
 * @property {number} [timeoutMs]  The client's own bound on waiting for the reply.
 */

/**
 * @typedef {object} Dispatched
 * @property {string} taskId
 * @property {boolean} duplicate
 */

/**
 * @typedef {object} RequestOptions
 * @property {number} [timeout=30]  Seconds the daemon waits for a result (then `timeout`).
 * @property {number} [timeoutMs]   The client's bound; default: `timeout` + `requestTimeoutMs`.
 */

/**
 * @typedef {object} TaskStatus
 * @property {string} taskId
 * @property {string} type
 * @property {string} state  queued, dispatched, running, retrying, completed or dead.
 * @property {number} attempts
 * @property {unknown} [result]
 * @property {unknown} [error]
 */

/**
 * @typedef {object} CollectOptions
 * @property {string[]} [taskIds]
 * @property {string} [groupId]
 * @property {number} [timeout=30]  Seconds.
 * @property {number} [minResults]
 * @property {number} [timeoutMs]
 */

/**
 * @typedef {object} Collected
 * @property {Record<string, unknown>} completed
 * @property {Record<string, unknown>} failed
 * @property {string[]} pending
 * @property {"all_done" | "min_results" | "timeout"} reason
 */

/* -------------------------------------------------------------- constants */

/** The daemon's error codes (DESIGN §4.3, fixed). */
export const ERROR_CODES = Object.freeze([
  "bad_json", "bad_request", "unknown_op", "too_large", "unauthorized",
  "forbidden", "not_found", "overloaded", "timeout", "internal",
]);

/**
 * Codes only this client produces: `disconnected` (a `dispatch` or `request`
 * was sent but the connection ended before its reply: it may or may not have
 * run) and `closed` (the client or subscription was closed).
 */
export const CLIENT_ERROR_CODES = Object.freeze(["disconnected", "closed"]);

/** @type {Required<Omit<ConnectOptions, "token" | "WebSocket" | "onStateChange" | "onError">>} */
const DEFAULTS = Object.freeze({
  maxQueued: 1000,
  requestTimeoutMs: 30_000,
  connectTimeoutMs: 10_000,
  reconnectInitialMs: 250,
  reconnectMaxMs: 30_000,
  keepaliveMs: 20_000,
  maxFrameBytes: 1_048_576,
  refreshBeforeMs: 60_000,
  closeTimeoutMs: 5_000,
});

const WS_OPEN = 1;
/** Headroom for the `"ref":N,` the client adds to a frame after measuring it. */
const REF_OVERHEAD_BYTES = 32;
/** setTimeout's largest delay; longer ones fire at once. */
const MAX_TIMER_MS = 2_147_483_647;
/** Error replies after which repeating an idempotent call can help (e.g. the daemon drains). */
const RETRYABLE_CALL_CODES = new Set(["overloaded"]);
/** Subscribe errors worth another try; the rest end the subscription. */
const RETRYABLE_SUBSCRIBE_CODES = new Set(["overloaded", "internal", "timeout", "unauthorized"]);
const WORD = "[A-Za-z0-9_-]+";
const TOPIC_RE = new RegExp(`^${WORD}(?:\\.${WORD})*$`);
const PATTERN_RE = new RegExp(`^(?:${WORD}|\\*|#)(?:\\.(?:${WORD}|\\*|#))*$`);
const MAX_TOPIC_LENGTH = 255;
const PRIORITIES = new Set(["low", "normal", "high", "critical"]);

/* ----------------------------------------------------------------- errors */

/** An error with one of {@link ERROR_CODES} or {@link CLIENT_ERROR_CODES} in `code`. */
export class AivadError extends Error {
  /**
   * @param {string} code
   * @param {string} [message]
   * @param {{cause?: unknown}} [options]
   */
  constructor(code, message = code, options) {
    super(message, options);
    this.name = "AivadError";
    /** @type {string} */
    this.code = code;
  }
}

/** @param {any} frame an `error` frame */
function errorFromFrame(frame) {
  return new AivadError(String(frame.code ?? "internal"), String(frame.message ?? ""));
}

/* ---------------------------------------------------------------- helpers */

/**
 * @param {unknown} topic
 * @param {string} what
 */
function checkTopic(topic, what) {
  if (typeof topic !== "string" || topic.length > MAX_TOPIC_LENGTH || !TOPIC_RE.test(topic)) {
    throw new AivadError("bad_request",
      `${what} must be 1..${MAX_TOPIC_LENGTH} characters of dot-separated words [A-Za-z0-9_-]+, got ${JSON.stringify(topic)}`);
  }
}

/** @param {unknown} pattern */
function checkPattern(pattern) {
  if (typeof pattern !== "string" || pattern.length > MAX_TOPIC_LENGTH || !PATTERN_RE.test(pattern)) {
    throw new AivadError("bad_request",
      `pattern must be 1..${MAX_TOPIC_LENGTH} characters of dot-separated words, * or #, got ${JSON.stringify(pattern)}`);
  }
}

/**
 * @param {unknown} value
 * @param {string} what
 */
function checkSeq(value, what) {
  if (!Number.isSafeInteger(value) || /** @type {number} */ (value) < 0) {
    throw new AivadError("bad_request", `${what} must be an integer >= 0, got ${JSON.stringify(value)}`);
  }
}

let encoder = /** @type {TextEncoder | null} */ (null);

/**
 * Whether `text` takes more than `maxBytes` in UTF-8, without encoding small frames.
 * @param {string} text
 * @param {number} maxBytes
 */
function exceedsBytes(text, maxBytes) {
  if (text.length > maxBytes) return true; // every UTF-16 unit is at least one byte
  if (text.length * 3 <= maxBytes) return false; // ... and at most three
  encoder ??= new TextEncoder();
  return encoder.encode(text).length > maxBytes;
}

/**
 * A fresh message id in the UUIDv7 layout: 48 bits of Unix milliseconds, then
 * random bits. Ids that grow with time land on the same few pages of the
 * daemon's message-id index, where random ones cost a page each per commit
 * (docs/performance.md). `crypto.getRandomValues` exists in every context,
 * plain-http pages on a LAN included (`crypto.randomUUID` only in secure ones).
 */
function newMessageId() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  let ms = Date.now();
  for (let i = 5; i >= 0; i--) {
    bytes[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  bytes[6] = (bytes[6] & 0x0f) | 0x70; // version 7
  bytes[8] = (bytes[8] & 0x3f) | 0x80; // variant 10
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * Capped exponential backoff with "equal jitter": half fixed, half random, so
 * a thousand pages reconnecting after a drain do not arrive in lockstep.
 * @param {number} attempt  0 for the first retry
 * @param {number} initialMs
 * @param {number} maxMs
 */
function backoffDelay(attempt, initialMs, maxMs) {
  const capped = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return capped / 2 + (Math.random() * capped) / 2;
}

/** A monotonic clock where there is one (timers must not jump with the wall clock). */
function now() {
  return globalThis.performance?.now() ?? Date.now();
}

/**
 * @param {string} url
 * @returns {string}
 */
function webSocketUrl(url) {
  const base = /** @type {any} */ (globalThis).location?.href;
  let parsed;
  try {
    parsed = new URL(url, base);
  } catch {
    throw new AivadError("bad_request", `not a URL: ${JSON.stringify(url)}`);
  }
  if (parsed.protocol === "http:" || parsed.protocol === "https:") {
    parsed.protocol = parsed.protocol === "https:" ? "wss:" : "ws:";
  }
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new AivadError("bad_request", `the URL must be ws:// or wss://, got ${JSON.stringify(url)}`);
  }
  return parsed.href;
}

/** @param {unknown} gap */
function validGap(gap) {
  return Array.isArray(gap) && gap.length === 2 && gap.every(Number.isSafeInteger)
    ? /** @type {[number, number]} */ ([gap[0], gap[1]])
    : null;
}

/**
 * Map a JS-style retry policy onto the wire's field names (snake_case passes through).
 * @param {RetryPolicy & Record<string, unknown>} policy
 */
function retryPolicyToWire(policy) {
  /** @type {Record<string, string>} */
  const names = { maxAttempts: "max_attempts", backoffFactor: "backoff_factor", maxBackoff: "max_backoff" };
  /** @type {Record<string, unknown>} */
  const wire = {};
  for (const [key, value] of Object.entries(policy)) {
    if (value !== undefined) wire[names[key] ?? key] = value;
  }
  return wire;
}

/**
 * Drop undefined fields, so that absent options are absent on the wire.
 * @param {Record<string, unknown>} fields
 */
function defined(fields) {
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined && v !== null));
}

/* ------------------------------------------------------- internal state */

/**
 * One user call (publish, history, ...) until it is answered.
 * @template T
 */
class Call {
  /**
   * @param {number} id  Call order: calls are (re)sent in this order.
   * @param {string} op
   * @param {string} body  The frame without its ref, encoded once.
   * @param {boolean} idempotent  Safe to send again after a lost connection.
   * @param {(reply: any, call: Call<T>) => T} decode
   */
  constructor(id, op, body, idempotent, decode) {
    this.id = id;
    this.op = op;
    this.body = body;
    this.idempotent = idempotent;
    this.decode = decode;
    /** @type {"queued" | "sent" | "waiting" | "done"} */
    this.state = "queued";
    /** How many times the frame went out. */
    this.sends = 0;
    /** @type {Link | null} */
    this.link = null;
    /** @type {number | null} */
    this.ref = null;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.timer = undefined;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.retryTimer = undefined;
    /** @type {(value: T) => void} */
    this.resolve = () => {};
    /** @type {(error: Error) => void} */
    this.reject = () => {};
    /** @type {Promise<T>} */
    this.promise = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
  }
}

/**
 * Who waits for the reply to one ref on a link.
 * @typedef {object} Waiter
 * @property {(frame: any) => void} onReply
 * @property {Call<any>} [call]  Set for user calls: what a lost connection does with them.
 */

/** One WebSocket connection and what waits on it; a new one per reconnect. */
class Link {
  /** @param {WebSocketLike} ws */
  constructor(ws) {
    this.ws = ws;
    /** Authenticated (or no token) and subscriptions sent: calls may go out. */
    this.ready = false;
    /** @type {Map<number, Waiter>} */
    this.pending = new Map();
    this.lastHeard = now();
    this.pingOutstanding = false;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.connectTimer = undefined;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.authTimer = undefined;
    /** @type {ReturnType<typeof setInterval> | undefined} */
    this.keepaliveTimer = undefined;
  }

  stopTimers() {
    clearTimeout(this.connectTimer);
    clearTimeout(this.authTimer);
    clearInterval(this.keepaliveTimer);
  }
}

/**
 * The client's side of one subscription; {@link Subscription} is its public face.
 */
class SubState {
  /**
   * @param {string} pattern
   * @param {number | null} since
   * @param {string | null} epoch
   * @param {MessageHandler} onMessage
   * @param {((status: SubscriptionStatus) => void) | undefined} onStatus
   */
  constructor(pattern, since, epoch, onMessage, onStatus) {
    this.pattern = pattern;
    /** The last seq handed out (or the start point): nothing at or below it is handed out again. */
    this.floor = since;
    this.epoch = epoch;
    this.onMessage = onMessage;
    this.onStatus = onStatus;
    /** idle: not subscribed on the current link; pending: subscribe sent; live: ok received. */
    /** @type {"idle" | "pending" | "live" | "ended"} */
    this.phase = "idle";
    this.subscribes = 0;
    /** Set when the history changed under us; reported with the next `ok`. */
    this.historyChanged = false;
    this.duplicatesDropped = 0;
    this.delivered = 0;
    /** @type {SubscriptionStatus | null} */
    this.status = null;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.retryTimer = undefined;
    this.retries = 0;
    this.readySettled = false;
    /** @type {(status: SubscriptionStatus) => void} */
    this.resolveReady = () => {};
    /** @type {(error: Error) => void} */
    this.rejectReady = () => {};
    /** @type {Promise<SubscriptionStatus>} */
    this.ready = new Promise((resolve, reject) => {
      this.resolveReady = resolve;
      this.rejectReady = reject;
    });
    this.ready.catch(() => {}); // not awaiting `ready` is fine: no unhandled rejection
  }
}

/* ------------------------------------------------------------ public API */

/**
 * One subscription of a {@link Client}. Get one from {@link Client#subscribe}.
 */
export class Subscription {
  #state;
  #close;

  /**
   * @param {SubState} state
   * @param {() => void} close
   */
  constructor(state, close) {
    this.#state = state;
    this.#close = close;
  }

  /** The subscribed pattern. */
  get pattern() {
    return this.#state.pattern;
  }

  /** The resume point: the last seq handed out, or where the subscription started. */
  get lastSeq() {
    return this.#state.floor;
  }

  /** The history's epoch from the latest reply (or the one given), to keep beside `lastSeq`. */
  get epoch() {
    return this.#state.epoch;
  }

  /** True once closed, refused, or ended by the daemon (`unsubscribed`). */
  get closed() {
    return this.#state.phase === "ended";
  }

  /** The latest status (null before the first reply). */
  get status() {
    return this.#state.status;
  }

  /**
   * Resolves with the first `subscribed` status, i.e. once the daemon confirmed:
   * a message published after that is certain to arrive. Rejects (with an
   * {@link AivadError}) if the subscription ends first.
   * @returns {Promise<SubscriptionStatus>}
   */
  get ready() {
    return this.#state.ready;
  }

  /** Counters for tests and dashboards. */
  statistics() {
    const s = this.#state;
    return { pattern: s.pattern, phase: s.phase, lastSeq: s.floor, subscribes: s.subscribes,
      delivered: s.delivered, duplicatesDropped: s.duplicatesDropped };
  }

  /** Stop: no `onMessage` call follows. Idempotent. `onStatus` gets `ended` / `closed`. */
  close() {
    this.#close();
  }
}

/**
 * Connect to the daemon at `url`. Returns at once: the client connects (and
 * reconnects) by itself, and calls made meanwhile wait for the connection.
 *
 * @param {string} url  `ws://host:port/` (any path); http(s) URLs are mapped to ws(s).
 * @param {ConnectOptions} [options]
 * @returns {Client}
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}

/**
 * A connection to the daemon that survives reconnects. Get one from {@link connect}.
 */
export class Client {
  #url;
  /** @type {typeof DEFAULTS & ConnectOptions} */
  #opts;
  #WebSocket;
  /** @type {Link | null} */
  #link = null;
  /** @type {ConnectionState} */
  #state = "connecting";
  /** Consecutive connection attempts that did not get to `ready`. */
  #attempt = 0;
  /** Connections that got to `ready`. */
  #connections = 0;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  #reconnectTimer = undefined;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  #refreshTimer = undefined;
  #nextRef = 0;
  #nextCallId = 0;
  /** Calls waiting for a connection, in call order. @type {Call<any>[]} */
  #queue = [];
  /** Every call not yet answered, wherever it is: what `maxQueued` bounds. @type {Set<Call<any>>} */
  #calls = new Set();
  /** @type {Map<string, SubState>} */
  #subs = new Map();
  /** The token the current identity was proven with; null: ask the token function. */
  /** @type {string | null} */
  #token = null;
  /** When `#token` expires (epoch ms, from the daemon's `expires_at`); null: unknown. */
  /** @type {number | null} */
  #tokenExpiresAt = null;
  #warnedNoAuth = false;
  /** @type {Promise<void> | null} */
  #closing = null;

  /**
   * @param {string} url
   * @param {ConnectOptions} options
   */
  constructor(url, options = {}) {
    this.#url = webSocketUrl(url);
    const impl = options.WebSocket ?? /** @type {any} */ (globalThis).WebSocket;
    if (typeof impl !== "function") {
      throw new AivadError("bad_request",
        "no WebSocket implementation: pass connect(url, {WebSocket}) (Node 20: run with --experimental-websocket)");
    }
    this.#WebSocket = /** @type {WebSocketConstructor} */ (impl);
    const token = options.token;
    if (token != null && typeof token !== "string" && typeof token !== "function") {
      throw new AivadError("bad_request", "token must be a string or a function returning one");
    }
    this.#opts = { ...DEFAULTS, ...defined({ ...options, token: token === "" ? undefined : token }) };
    // after connect() returned: callbacks may then use the variable the client is assigned to
    queueMicrotask(() => this.#connectOnce());
  }

  /** The connection's state: connecting, open, disconnected (waiting to retry) or closed. */
  get state() {
    return this.#state;
  }

  /** The URL connected to. */
  get url() {
    return this.#url;
  }

  /** Counters for tests and dashboards. */
  statistics() {
    return {
      state: this.#state,
      connections: this.#connections,
      unanswered: this.#calls.size,
      queued: this.#queue.length,
      subscriptions: this.#subs.size,
    };
  }

  /* ---------------------------------------------------------------- ops */

  /**
   * Subscribe to `pattern`. Returns at once; messages arrive in `onMessage`,
   * each seq once, ascending, across reconnects.
   *
   * One client holds one subscription per pattern (the daemon allows one per
   * connection, and two local subscriptions sharing one would have to share a
   * resume point): subscribing again to a pattern this client has open throws
   * `bad_request`. Close the first one, or use another client.
   *
   * @param {string} pattern
   * @param {SubscribeOptions | MessageHandler} options  May be omitted: `subscribe(p, onMessage)`.
   * @param {MessageHandler} [onMessage]
   * @returns {Subscription}
   * @throws {AivadError} `bad_request` for an invalid pattern, `since` or a pattern already
   *   subscribed; `closed` after `close()`.
   */
  subscribe(pattern, options, onMessage) {
    if (typeof options === "function") [options, onMessage] = [{}, options];
    const { since = null, epoch = null, onStatus } = options ?? {};
    checkPattern(pattern);
    if (since !== null) checkSeq(since, "since");
    if (epoch !== null && typeof epoch !== "string") throw new AivadError("bad_request", "epoch must be a string");
    if (typeof onMessage !== "function") throw new TypeError("subscribe needs an onMessage function");
    if (this.#state === "closed") throw new AivadError("closed", "the client is closed");
    if (this.#subs.has(pattern)) {
      throw new AivadError("bad_request", `already subscribed to ${pattern} on this client: close that subscription first`);
    }
    const sub = new SubState(pattern, since, epoch, onMessage, onStatus);
    this.#subs.set(pattern, sub);
    if (this.#link?.ready) this.#sendSubscribe(this.#link, sub);
    return new Subscription(sub, () => this.#closeSubscription(sub));
  }

  /**
   * Store one message; resolves once the daemon committed it.
   *
   * A `message_id` always goes out (generated when not given), so the client
   * can send the publish again after a lost connection and the daemon still
   * stores it once. Made while disconnected, it waits in the queue.
   *
   * @param {string} type  The topic.
   * @param {unknown} [payload=null]  Any JSON value.
   * @param {PublishOptions} [options]
   * @returns {Promise<Published>}
   */
  async publish(type, payload = null, options = {}) {
    const { messageId, metadata, timeoutMs } = options;
    checkTopic(type, "type");
    if (messageId !== undefined && (typeof messageId !== "string" || messageId.length < 1 || messageId.length > 255)) {
      throw new AivadError("bad_request", "messageId must be a string of 1..255 characters");
    }
    if (metadata !== undefined && (metadata === null || typeof metadata !== "object" || Array.isArray(metadata))) {
      throw new AivadError("bad_request", "metadata must be an object");
    }
    const id = messageId ?? newMessageId();
    const generated = messageId === undefined;
    /** @type {Record<string, unknown>} */
    const fields = { type, payload: payload ?? null, message_id: id }; // null is a value: always sent
    if (metadata !== undefined) fields.metadata = metadata;
    return this.#call("publish", fields, {
      idempotent: true,
      timeoutMs,
      decode: (reply, call) => ({
        seq: reply.seq,
        // after our own resend, the daemon's "duplicate" may be our first send
        duplicate: Boolean(reply.duplicate) && !(generated && call.sends > 1),
        messageId: id,
      }),
    });
  }

  /**
   * One page of stored messages matching `pattern` with seq > `after`, ascending.
   * @param {string} pattern
   * @param {HistoryOptions} [options]
   * @returns {Promise<HistoryPage>}
   */
  async history(pattern, options = {}) {
    const { after = 0, limit = 100, timeoutMs } = options;
    checkPattern(pattern);
    checkSeq(after, "after");
    return this.#call("history", { pattern, after, limit }, {
      idempotent: true,
      timeoutMs,
      decode: (reply) => ({ messages: reply.messages ?? [], lastSeq: reply.last_seq ?? after }),
    });
  }

  /**
   * Queue a task for a worker; resolves with its id once the daemon queued it.
   * Not sent again after a lost connection (it may have been queued): fails
   * with `disconnected` then.
   * @param {string} type  The task type.
   * @param {unknown} [payload=null]
   * @param {DispatchOptions} [options]
   * @returns {Promise<Dispatched>}
   */
  async dispatch(type, payload = null, options = {}) {
    checkTopic(type, "type");
    const { timeoutMs, ...spec } = options;
    return this.#call("dispatch", { type, payload, ...taskFields(spec) }, {
      idempotent: false,
      timeoutMs,
      decode: (reply) => ({ taskId: reply.task_id, duplicate: Boolean(reply.duplicate) }),
    });
  }

  /**
   * Run one task like a function call and resolve with its result. Rejects
   * with `timeout` when no worker answered within `timeout` seconds, and with
   * the daemon's error when the task failed.
   * @param {string} type
   * @param {unknown} [payload=null]
   * @param {RequestOptions & Omit<DispatchOptions, "timeoutMs">} [options]
   * @returns {Promise<unknown>}
   */
  async request(type, payload = null, options = {}) {
    checkTopic(type, "type");
    const { timeout = 30, timeoutMs, ...spec } = options;
    if (typeof timeout !== "number" || !(timeout >= 0)) throw new AivadError("bad_request", "timeout must be seconds >= 0");
    return this.#call("request", { type, payload, ...taskFields(spec), timeout }, {
      idempotent: false,
      // the daemon owns the deadline; ours only adds slack for the reply to travel
      timeoutMs: timeoutMs ?? timeout * 1000 + this.#opts.requestTimeoutMs,
      decode: (reply) => reply.result,
    });
  }

  /**
   * State, attempts and result or error of one task.
   * @param {string} taskId
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<TaskStatus>}
   */
  async taskStatus(taskId, options = {}) {
    return this.#call("task.status", { task_id: taskId }, {
      idempotent: true,
      timeoutMs: options.timeoutMs,
      decode: (reply) => /** @type {TaskStatus} */ (defined({ taskId: reply.task_id, type: reply.type,
        state: reply.state, attempts: reply.attempts, result: reply.result, error: reply.error })),
    });
  }

  /**
   * Wait up to `timeout` seconds for tasks (by ids or group); partial results on timeout.
   * @param {CollectOptions} options
   * @returns {Promise<Collected>}
   */
  async collect(options) {
    const { taskIds, groupId, timeout = 30, minResults, timeoutMs } = options;
    const fields = defined({ task_ids: taskIds, group_id: groupId, timeout, min_results: minResults });
    return this.#call("collect", fields, {
      idempotent: true,
      timeoutMs: timeoutMs ?? timeout * 1000 + this.#opts.requestTimeoutMs,
      decode: (reply) => ({ completed: reply.completed ?? {}, failed: reply.failed ?? {},
        pending: reply.pending ?? [], reason: reply.reason }),
    });
  }

  /**
   * A round trip to the daemon; resolves with the milliseconds it took.
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<number>}
   */
  async ping(options = {}) {
    const start = now();
    return this.#call("ping", {}, { idempotent: true, timeoutMs: options.timeoutMs, decode: () => now() - start });
  }

  /**
   * Close the connection and every subscription; pending calls fail with
   * `closed`. Resolves once the closing handshake is done (at most
   * `closeTimeoutMs`). Idempotent.
   * @returns {Promise<void>}
   */
  close() {
    if (this.#closing) return this.#closing;
    this.#setState("closed", {});
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#refreshTimer);
    for (const sub of [...this.#subs.values()]) this.#endSubscription(sub, "closed");
    for (const call of [...this.#calls]) this.#fail(call, new AivadError("closed", "the client is closed"));
    const link = this.#link;
    this.#link = null;
    this.#closing = link ? closeGracefully(link, this.#opts.closeTimeoutMs) : Promise.resolve();
    return this.#closing;
  }

  /* ------------------------------------------------------- connections */

  /** Get a token if there is one, open a socket, and wire its events to this client. */
  async #connectOnce() {
    if (this.#state === "closed") return;
    this.#setState("connecting", { attempt: this.#attempt });
    /** @type {string | null} */
    let token = null;
    if (this.#opts.token != null) {
      // before the socket: a slow token function (a login prompt) must not eat the daemon's auth timeout
      try {
        token = await this.#currentToken();
      } catch (error) {
        this.#report(new AivadError("unauthorized", `the token function failed: ${error}`, { cause: error }));
        this.#scheduleReconnect(undefined, "no token");
        return;
      }
      if (this.#isClosed()) return; // closed while the token function ran
    }
    let ws;
    try {
      ws = new this.#WebSocket(this.#url);
    } catch (error) {
      this.#report(/** @type {Error} */ (error));
      this.#scheduleReconnect(undefined, String(error));
      return;
    }
    const link = new Link(ws);
    this.#link = link;
    link.connectTimer = setTimeout(() => this.#giveUp(link, "connect timed out"), this.#opts.connectTimeoutMs);
    ws.onopen = () => this.#onOpen(link, token);
    ws.onmessage = (event) => this.#onFrame(link, event.data);
    ws.onclose = (event) => this.#onClose(link, event.code, event.reason);
    // Browsers follow an error with a close event; Node 20's WebSocket does not always
    // (a refused connection fires only `error`), so an error ends the link by itself.
    ws.onerror = () => this.#giveUp(link, "connection failed");
  }

  /**
   * @param {Link} link
   * @param {string | null} token
   */
  #onOpen(link, token) {
    if (link !== this.#link) return;
    clearTimeout(link.connectTimer);
    if (token === null) {
      this.#onReady(link);
    } else {
      this.#authenticate(link, token, true);
    }
  }

  /**
   * Authentication done (or not needed): resume subscriptions, send what waited.
   * @param {Link} link
   */
  #onReady(link) {
    link.ready = true;
    this.#attempt = 0;
    this.#connections++;
    this.#setState("open", {});
    link.keepaliveTimer = setInterval(() => this.#keepalive(link), this.#opts.keepaliveMs);
    for (const sub of this.#subs.values()) {
      if (sub.phase === "idle") this.#sendSubscribe(link, sub);
    }
    const waiting = this.#queue.sort((a, b) => a.id - b.id);
    this.#queue = [];
    for (const call of waiting) this.#send(call, link);
  }

  /**
   * @param {Link} link
   * @param {unknown} data
   */
  #onFrame(link, data) {
    if (link !== this.#link) return;
    link.lastHeard = now();
    link.pingOutstanding = false;
    let frame;
    try {
      frame = JSON.parse(String(data));
    } catch {
      this.#report(new AivadError("bad_json", `the daemon sent a frame that is not JSON: ${String(data).slice(0, 200)}`));
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (frame.op === "message") {
      const sub = this.#subs.get(frame.pattern);
      if (sub) this.#deliver(sub, frame.msg);
      return;
    }
    if (frame.op === "unsubscribed") {
      const sub = this.#subs.get(frame.pattern);
      // only a live subscription: a pending one's subscribe is still ahead in the daemon's queue
      if (sub?.phase === "live") this.#endSubscription(sub, String(frame.reason ?? "unsubscribed"));
      return;
    }
    const waiter = link.pending.get(frame.ref);
    if (waiter) {
      link.pending.delete(frame.ref);
      waiter.onReply(frame);
    } else if (frame.op === "error") {
      this.#report(errorFromFrame(frame));
    }
  }

  /**
   * @param {Link} link
   * @param {number} code
   * @param {string} reason
   */
  #onClose(link, code, reason) {
    if (link !== this.#link) return;
    this.#lost(link, code, reason);
  }

  /**
   * Our side gives a connection up (no handshake, no pong, auth refused):
   * forget it at once rather than wait for a close event that may take minutes.
   * @param {Link} link
   * @param {string} why
   */
  #giveUp(link, why) {
    if (link !== this.#link) return;
    abandon(link.ws, why);
    this.#lost(link, 1006, why);
  }

  /**
   * A connection ended: requeue what is safe to repeat, fail the rest, reconnect.
   * @param {Link} link
   * @param {number} code
   * @param {string} reason
   */
  #lost(link, code, reason) {
    this.#link = null;
    link.stopTimers();
    clearTimeout(this.#refreshTimer);
    if (code === 4001) {
      this.#token = null; // expired or never accepted: ask for a fresh one
      const why = this.#opts.token == null ? "the daemon requires a token" : "the token expired or was not accepted in time";
      this.#report(new AivadError("unauthorized", `closed with 4001: ${why}`));
    }
    const tooLarge = code === 1009 ? largestCall(link) : null;
    for (const waiter of link.pending.values()) {
      const call = waiter.call;
      if (!call || call.state !== "sent") continue;
      if (call === tooLarge) {
        this.#fail(call, new AivadError("too_large", "the daemon closed the connection (1009): this frame is too large"));
      } else if (call.idempotent) {
        call.state = "queued";
        call.link = null;
        this.#queue.push(call);
      } else {
        this.#fail(call, new AivadError("disconnected",
          `the connection closed (${code}) before the reply to ${call.op}: it may or may not have been done`));
      }
    }
    link.pending.clear();
    for (const sub of this.#subs.values()) {
      if (sub.phase === "pending" || sub.phase === "live") sub.phase = "idle";
      clearTimeout(sub.retryTimer);
    }
    if (this.#state !== "closed") this.#scheduleReconnect(code, reason);
  }

  /**
   * @param {number | undefined} code
   * @param {string} reason
   */
  #scheduleReconnect(code, reason) {
    if (this.#isClosed()) return;
    const delay = backoffDelay(this.#attempt++, this.#opts.reconnectInitialMs, this.#opts.reconnectMaxMs);
    this.#setState("disconnected", { code, reason, retryInMs: Math.round(delay) });
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = undefined;
      if (this.#state !== "closed") this.#connectOnce();
    }, delay);
  }

  /**
   * Ping after `keepaliveMs` of silence; give up after another without any frame,
   * so a half-open TCP connection (a laptop that slept) cannot hold us forever.
   * @param {Link} link
   */
  #keepalive(link) {
    if (link !== this.#link || now() - link.lastHeard < this.#opts.keepaliveMs) return;
    if (link.pingOutstanding) {
      this.#giveUp(link, "no answer to a keepalive ping");
      return;
    }
    link.pingOutstanding = true;
    this.#sendInternal(link, { op: "ping" }, () => {});
  }

  #isClosed() {
    return this.#state === "closed";
  }

  /**
   * @param {ConnectionState} state
   * @param {StateDetail} detail
   */
  #setState(state, detail) {
    if (this.#state === "closed" && state !== "closed") return;
    this.#state = state;
    try {
      this.#opts.onStateChange?.(state, detail);
    } catch (error) {
      this.#report(/** @type {Error} */ (error));
    }
  }

  /** @param {Error} error */
  #report(error) {
    try {
      (this.#opts.onError ?? defaultOnError)(error);
    } catch {
      // an error handler that throws has nowhere left to report to
    }
  }

  /**
   * Send an internal frame (auth, subscribe, unsubscribe, ping) with a fresh ref.
   * @param {Link} link
   * @param {Record<string, unknown>} frame
   * @param {(reply: any) => void} onReply
   */
  #sendInternal(link, frame, onReply) {
    const ref = ++this.#nextRef;
    link.pending.set(ref, { onReply });
    link.ws.send(JSON.stringify({ ...frame, ref }));
    return ref;
  }

  /* ----------------------------------------------------------- tokens */

  /** The token to prove our identity with on a new connection. */
  async #currentToken() {
    const source = this.#opts.token;
    if (typeof source === "string") return source;
    const expiring = this.#tokenExpiresAt !== null && this.#tokenExpiresAt - Date.now() < this.#opts.refreshBeforeMs;
    if (this.#token !== null && !expiring) return this.#token;
    return this.#freshToken();
  }

  /** Ask the token function (sync or async) again. */
  async #freshToken() {
    const source = /** @type {() => string | Promise<string>} */ (this.#opts.token);
    const token = await source();
    if (typeof token !== "string" || token === "") throw new AivadError("unauthorized", "the token function returned no token");
    return token;
  }

  /**
   * @param {Link} link
   * @param {string} token
   * @param {boolean} initial  The first frame of the connection (else a refresh).
   */
  #authenticate(link, token, initial) {
    if (initial) link.authTimer = setTimeout(() => this.#giveUp(link, "no reply to auth"), this.#opts.requestTimeoutMs);
    this.#sendInternal(link, { op: "auth", token }, (reply) => {
      if (initial) clearTimeout(link.authTimer);
      if (link !== this.#link) return;
      this.#onAuthReply(link, reply, token, initial);
    });
  }

  /**
   * @param {Link} link
   * @param {any} reply
   * @param {string} token
   * @param {boolean} initial
   */
  #onAuthReply(link, reply, token, initial) {
    if (reply.op === "ok") {
      this.#token = token;
      const expiresAt = Date.parse(reply.expires_at);
      this.#tokenExpiresAt = Number.isFinite(expiresAt) ? expiresAt : null;
      this.#scheduleRefresh();
      if (initial) this.#onReady(link);
      return;
    }
    const error = errorFromFrame(reply);
    if (error.code === "unknown_op") {
      // A daemon without authentication: it grants every client every right, so there is nothing to prove.
      this.#token = token; // nothing refused it: reconnects reuse it as they would an accepted one
      if (!this.#warnedNoAuth) {
        this.#warnedNoAuth = true;
        this.#report(new AivadError("unknown_op", "the daemon does not know the auth op; continuing without authentication"));
      }
      if (initial) this.#onReady(link);
      return;
    }
    this.#report(error);
    if (initial) {
      this.#token = null; // the next attempt asks the token function again
      this.#giveUp(link, `auth refused: ${error.code}`);
    } else {
      this.#scheduleRefresh(true); // the daemon keeps the old identity until it expires: try again
    }
  }

  /**
   * Refresh before expiry: at `expires_at` − min(`refreshBeforeMs`, half the
   * remaining lifetime). A string token cannot be refreshed: the daemon closes
   * with 4001 at expiry and the reconnect presents it again.
   * @param {boolean} [retry]  After a failed refresh: try again halfway to expiry.
   */
  #scheduleRefresh(retry = false) {
    clearTimeout(this.#refreshTimer);
    if (typeof this.#opts.token !== "function" || this.#tokenExpiresAt === null) return;
    const remaining = this.#tokenExpiresAt - Date.now();
    if (retry && remaining < 2000) return; // too late: the 4001 close and a fresh token follow
    const lead = retry ? remaining / 2 : Math.min(this.#opts.refreshBeforeMs, remaining / 2);
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, remaining - lead));
    this.#refreshTimer = setTimeout(() => this.#refresh(), delay);
  }

  async #refresh() {
    const link = this.#link;
    if (!link?.ready) return; // the next connection authenticates anyway
    let token;
    try {
      token = await this.#freshToken();
    } catch (error) {
      this.#report(new AivadError("unauthorized", `the token function failed: ${error}`, { cause: error }));
      this.#scheduleRefresh(true);
      return;
    }
    if (link === this.#link) this.#authenticate(link, token, false);
  }

  /* ------------------------------------------------------------ calls */

  /**
   * The one path every user call takes: bound, size check, timeout, queue or send.
   * @template T
   * @param {string} op
   * @param {Record<string, unknown>} fields
   * @param {{idempotent: boolean, timeoutMs?: number, decode: (reply: any, call: Call<T>) => T}} how
   * @returns {Promise<T>}
   */
  #call(op, fields, { idempotent, timeoutMs, decode }) {
    if (this.#state === "closed") return Promise.reject(new AivadError("closed", "the client is closed"));
    if (this.#calls.size >= this.#opts.maxQueued) {
      return Promise.reject(new AivadError("overloaded",
        `${this.#calls.size} calls are waiting already (maxQueued): ${op} refused`));
    }
    let body;
    try {
      body = JSON.stringify({ op, ...fields });
    } catch (error) {
      return Promise.reject(new AivadError("bad_request", `${op}: not JSON-serializable: ${error}`, { cause: error }));
    }
    if (exceedsBytes(body, this.#opts.maxFrameBytes - REF_OVERHEAD_BYTES)) {
      return Promise.reject(new AivadError("too_large", `the ${op} frame exceeds maxFrameBytes=${this.#opts.maxFrameBytes}`));
    }
    const call = new Call(++this.#nextCallId, op, body, idempotent, decode);
    this.#calls.add(call);
    const limit = timeoutMs ?? this.#opts.requestTimeoutMs;
    if (Number.isFinite(limit)) {
      call.timer = setTimeout(() => {
        this.#fail(call, new AivadError("timeout", `no reply to ${op} within ${limit} ms`));
      }, Math.min(limit, MAX_TIMER_MS));
    }
    this.#submit(call);
    return call.promise;
  }

  /**
   * Send now if connected, else wait in the queue.
   * @param {Call<any>} call
   */
  #submit(call) {
    const link = this.#link;
    if (link?.ready) {
      this.#send(call, link);
    } else {
      call.state = "queued";
      this.#queue.push(call);
    }
  }

  /**
   * @param {Call<any>} call
   * @param {Link} link
   */
  #send(call, link) {
    const ref = ++this.#nextRef;
    call.ref = ref;
    call.link = link;
    call.state = "sent";
    call.sends++;
    link.pending.set(ref, { call, onReply: (reply) => this.#onCallReply(call, reply) });
    link.ws.send(`{"ref":${ref},${call.body.slice(1)}`);
  }

  /**
   * @param {Call<any>} call
   * @param {any} reply
   */
  #onCallReply(call, reply) {
    if (call.state !== "sent") return;
    if (reply.op !== "error") {
      let value;
      try {
        value = call.decode(reply, call);
      } catch (error) {
        this.#fail(call, new AivadError("internal", `unexpected reply to ${call.op}: ${error}`));
        return;
      }
      this.#settle(call);
      call.resolve(value);
      return;
    }
    const error = errorFromFrame(reply);
    if (call.idempotent && RETRYABLE_CALL_CODES.has(error.code)) {
      // e.g. `overloaded` while the daemon drains: the same message_id stays safe to send again
      call.state = "waiting";
      call.link = null;
      const delay = backoffDelay(call.sends - 1, this.#opts.reconnectInitialMs, this.#opts.reconnectMaxMs);
      call.retryTimer = setTimeout(() => {
        if (call.state === "waiting") this.#submit(call);
      }, delay);
      return;
    }
    this.#fail(call, error);
  }

  /**
   * Take a call out of every place it can be waiting in.
   * @param {Call<any>} call
   */
  #settle(call) {
    if (call.state === "queued") this.#queue = this.#queue.filter((c) => c !== call);
    if (call.state === "sent" && call.ref !== null) call.link?.pending.delete(call.ref);
    call.state = "done";
    call.link = null;
    clearTimeout(call.timer);
    clearTimeout(call.retryTimer);
    this.#calls.delete(call);
  }

  /**
   * @param {Call<any>} call
   * @param {Error} error
   */
  #fail(call, error) {
    if (call.state === "done") return;
    this.#settle(call);
    call.reject(error);
  }

  /* ---------------------------------------------------- subscriptions */

  /**
   * Subscribe (again) on `link`, from the last seq handed out and its epoch.
   * @param {Link} link
   * @param {SubState} sub
   */
  #sendSubscribe(link, sub) {
    const since = sub.floor;
    sub.phase = "pending";
    sub.subscribes++;
    this.#sendInternal(link, defined({ op: "subscribe", pattern: sub.pattern, since, epoch: sub.epoch }), (reply) =>
      this.#onSubscribeReply(link, sub, reply, since));
  }

  /**
   * @param {Link} link
   * @param {SubState} sub
   * @param {any} reply
   * @param {number | null} since  What this subscribe asked for.
   */
  #onSubscribeReply(link, sub, reply, since) {
    if (sub.phase !== "pending" || link !== this.#link) return; // closed, or a stale reply
    if (reply.op === "error") {
      this.#onSubscribeError(link, sub, errorFromFrame(reply));
      return;
    }
    sub.retries = 0;
    if (typeof reply.epoch === "string") sub.epoch = reply.epoch;
    const lastSeq = Number.isSafeInteger(reply.last_seq) ? reply.last_seq : null;
    // `since` above the newest seq: the history we knew is gone (a re-created store)
    const changed = reply.epoch_changed === true || (since !== null && lastSeq !== null && since > lastSeq);
    if (changed) {
      // the daemon replays this history from its oldest message (recovered: false)
      sub.historyChanged = true;
      sub.floor = 0; // every seq of the new history is new to us
    }
    if (sub.floor === null) sub.floor = lastSeq ?? 0;
    sub.phase = "live";
    /** @type {SubscriptionStatus} */
    const status = {
      state: "subscribed",
      recovered: reply.recovered !== false && !sub.historyChanged,
      gap: validGap(reply.gap),
      epoch: sub.epoch,
      epochChanged: sub.historyChanged,
      lastSeq: sub.floor,
      resumed: sub.status !== null,
    };
    sub.historyChanged = false;
    sub.status = status;
    if (!sub.readySettled) {
      sub.readySettled = true;
      sub.resolveReady(status);
    }
    this.#notify(sub, status);
  }

  /**
   * @param {Link} link
   * @param {SubState} sub
   * @param {AivadError} error
   */
  #onSubscribeError(link, sub, error) {
    if (!RETRYABLE_SUBSCRIBE_CODES.has(error.code)) {
      this.#endSubscription(sub, error.code, error);
      return;
    }
    sub.phase = "idle";
    const delay = backoffDelay(sub.retries++, this.#opts.reconnectInitialMs, this.#opts.reconnectMaxMs);
    sub.retryTimer = setTimeout(() => {
      if (sub.phase === "idle" && link === this.#link && link.ready) this.#sendSubscribe(link, sub);
    }, delay);
  }

  /**
   * Hand one pushed message to the subscriber, unless it was handed out already.
   * @param {SubState} sub
   * @param {any} msg
   */
  #deliver(sub, msg) {
    if (sub.phase !== "live") return; // before the ok: left over from an earlier subscription
    const seq = msg?.seq;
    if (!Number.isSafeInteger(seq)) return;
    if (sub.floor !== null && seq <= sub.floor) {
      sub.duplicatesDropped++;
      return;
    }
    sub.floor = seq;
    sub.delivered++;
    try {
      sub.onMessage(msg, { pattern: sub.pattern });
    } catch (error) {
      this.#report(/** @type {Error} */ (error));
    }
  }

  /** @param {SubState} sub */
  #closeSubscription(sub) {
    const wasSubscribed = sub.phase === "pending" || sub.phase === "live";
    this.#endSubscription(sub, "closed");
    const link = this.#link;
    if (wasSubscribed && link?.ready) this.#sendInternal(link, { op: "unsubscribe", pattern: sub.pattern }, () => {});
  }

  /**
   * @param {SubState} sub
   * @param {string} reason
   * @param {AivadError} [error]
   */
  #endSubscription(sub, reason, error) {
    if (sub.phase === "ended") return;
    sub.phase = "ended";
    clearTimeout(sub.retryTimer);
    if (this.#subs.get(sub.pattern) === sub) this.#subs.delete(sub.pattern);
    /** @type {SubscriptionStatus} */
    const status = {
      recovered: true, gap: null, epochChanged: false, resumed: false,
      ...sub.status, epoch: sub.epoch, lastSeq: sub.floor, state: "ended", reason,
      ...(error ? { error } : {}),
    };
    sub.status = status;
    if (!sub.readySettled) {
      sub.readySettled = true;
      sub.rejectReady(error ?? new AivadError(reason === "closed" ? "closed" : reason, `subscription to ${sub.pattern} ended: ${reason}`));
    }
    this.#notify(sub, status);
  }

  /**
   * @param {SubState} sub
   * @param {SubscriptionStatus} status
   */
  #notify(sub, status) {
    try {
      sub.onStatus?.(status);
    } catch (error) {
      this.#report(/** @type {Error} */ (error));
    }
  }
}

/* ----------------------------------------------------- module internals */

/**
 * The wire fields of a task spec from JS-style options.
 * @param {Omit<DispatchOptions, "timeoutMs">} spec
 */
function taskFields(spec) {
  const { priority, retryPolicy, timeout, heartbeat, affinityKey, groupId } = spec;
  if (priority !== undefined && !PRIORITIES.has(/** @type {string} */ (priority)) &&
      !(Number.isInteger(priority) && /** @type {number} */ (priority) >= 0 && /** @type {number} */ (priority) <= 9)) {
    throw new AivadError("bad_request", "priority must be low, normal, high, critical or 0..9");
  }
  return defined({
    priority,
    retry_policy: retryPolicy ? retryPolicyToWire(retryPolicy) : undefined,
    timeout,
    heartbeat,
    affinity_key: affinityKey,
    group_id: groupId,
  });
}

/**
 * The sent user call with the largest frame: after a 1009 close it is the one
 * to fail, so the client does not send it again and again.
 * @param {Link} link
 */
function largestCall(link) {
  let largest = /** @type {Call<any> | null} */ (null);
  for (const { call } of link.pending.values()) {
    if (call && (largest === null || call.body.length > largest.body.length)) largest = call;
  }
  return largest;
}

/**
 * Stop listening to a socket and close it without waiting for its close event.
 * @param {WebSocketLike} ws
 * @param {string} why
 */
function abandon(ws, why) {
  ws.onopen = ws.onmessage = ws.onclose = null;
  ws.onerror = () => {};
  try {
    ws.close(4000, why.slice(0, 100));
  } catch {
    // already closing or closed
  }
}

/**
 * Close with 1000 and wait for the close event, at most `timeoutMs`.
 * @param {Link} link
 * @param {number} timeoutMs
 * @returns {Promise<void>}
 */
function closeGracefully(link, timeoutMs) {
  link.stopTimers();
  const ws = link.ws;
  if (ws.readyState !== WS_OPEN) {
    abandon(ws, "client closed"); // nothing to close gracefully (and no close event may come)
    return Promise.resolve();
  }
  return new Promise((resolve) => {
    const timer = setTimeout(done, timeoutMs);
    function done() {
      clearTimeout(timer);
      ws.onopen = ws.onmessage = ws.onclose = null;
      resolve();
    }
    ws.onopen = ws.onmessage = null;
    ws.onclose = done;
    ws.onerror = () => {};
    try {
      ws.close(1000, "client closed");
    } catch {
      done();
    }
  });
}

/** @param {Error} error */
function defaultOnError(error) {
  console.warn("aivad client:", error);
}
