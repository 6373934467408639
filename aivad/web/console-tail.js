// @ts-check
/**
 * The live tail: every message the token may see, newest first.
 *
 * Built to stay responsive at 1,000 messages/s and beyond:
 *
 * - `onMessage` only queues the envelope; rendering happens once per
 *   animation frame, for the whole batch, in one DOM insertion.
 * - The table keeps at most `maxRows` rows, and the queue at most as many
 *   envelopes: a burst bigger than that renders only its newest `maxRows`
 *   (the older ones are counted, and stay in the daemon's history). So the
 *   work per frame is bounded whatever the rate, and so is memory.
 * - Pausing stops rendering, not receiving: the queue keeps the newest
 *   `maxRows` meanwhile, and resuming renders them.
 *
 * Exactly-once and order come from the browser client: each subscription
 * hands out each seq once, ascending, across reconnects and daemon restarts
 * (it resumes from the last seq it handed out). With one pattern the tail
 * relies on that alone; with several (a token granted several patterns) one
 * message can match two subscriptions, so a bounded set of recent seqs drops
 * the second copy.
 *
 * @module aivad/console-tail
 */

import { clockTime, definitionList, el, json, preview } from "./console-lib.js";

/** @typedef {import("/client.js").Client} Client */
/** @typedef {import("/client.js").Subscription} Subscription */
/** @typedef {import("/client.js").Envelope} Envelope */
/** @typedef {import("/client.js").SubscriptionStatus} SubscriptionStatus */

/** @typedef {{envelope: Envelope, pattern: string}} Received */

/** Rows kept in the table (and envelopes kept while paused). */
export const MAX_ROWS = 500;
/** Seqs remembered to drop a message delivered by two subscriptions. */
const RECENT_SEQS = 10_000;

export class LiveTail {
  /** @type {Subscription[]} */
  #subs = [];
  /** Received, not yet rendered; never more than `maxRows`. @type {Received[]} */
  #queue = [];
  /** @type {number | null} */
  #frame = null;
  #paused = false;
  #received = 0;
  #lastSeq = /** @type {number | null} */ (null);
  /** @type {Set<number>} */
  #recent = new Set();
  /** Row → what it shows, for the detail dialog. @type {WeakMap<Element, Received>} */
  #rowData = new WeakMap();
  /** Pattern → its latest status, for the "following" line. @type {Map<string, SubscriptionStatus | null>} */
  #statuses = new Map();

  /**
   * @param {Client} client
   * @param {{tbody: HTMLTableSectionElement, following: HTMLElement, counters: HTMLElement,
   *   notice: HTMLElement, detail: HTMLDialogElement, maxRows?: number}} parts
   */
  constructor(client, { tbody, following, counters, notice, detail, maxRows = MAX_ROWS }) {
    this.client = client;
    this.tbody = tbody;
    this.following = following;
    this.counters = counters;
    this.notice = notice;
    this.detail = detail;
    this.maxRows = maxRows;
    tbody.addEventListener("click", (event) => this.#onClick(event));
  }

  /**
   * Follow `patterns` from now on: the table starts empty. An empty list shows why.
   * @param {string[]} patterns
   */
  follow(patterns) {
    this.stop();
    this.#queue = [];
    this.#received = 0;
    this.#lastSeq = null;
    this.#recent.clear();
    this.#statuses.clear();
    this.tbody.replaceChildren();
    this.#say(patterns.length ? "" : "This token may not subscribe to anything.");
    for (const pattern of patterns) {
      this.#statuses.set(pattern, null);
      try {
        this.#subs.push(this.client.subscribe(pattern, { onStatus: (s) => this.#onStatus(pattern, s) },
          (envelope, info) => this.#receive(envelope, info.pattern)));
      } catch (error) {
        this.#say(`Cannot follow ${pattern}: ${/** @type {Error} */ (error).message}`);
      }
    }
    this.#showCounters();
    this.#showFollowing();
  }

  /** End every subscription (a new `follow` starts over). */
  stop() {
    for (const sub of this.#subs) sub.close();
    this.#subs = [];
  }

  get paused() {
    return this.#paused;
  }

  /** @param {boolean} paused */
  setPaused(paused) {
    this.#paused = paused;
    if (!paused) this.#schedule();
    this.#showCounters();
  }

  /* --------------------------------------------------------- receiving */

  /**
   * The subscriptions' `onMessage`: queue only, render later.
   * @param {Envelope} envelope
   * @param {string} pattern
   */
  #receive(envelope, pattern) {
    if (this.#subs.length > 1 && this.#seenBefore(envelope.seq)) return;
    this.#received++;
    this.#lastSeq = Math.max(this.#lastSeq ?? 0, envelope.seq);
    this.#queue.push({ envelope, pattern });
    // amortized trim: the queue never holds more than twice what one frame can show
    if (this.#queue.length > 2 * this.maxRows) this.#queue.splice(0, this.#queue.length - this.maxRows);
    this.#schedule();
  }

  /** @param {number} seq */
  #seenBefore(seq) {
    if (this.#recent.has(seq)) return true;
    this.#recent.add(seq);
    if (this.#recent.size > RECENT_SEQS) this.#recent.delete(this.#recent.values().next().value);
    return false;
  }

  /** At most one frame pending, however many messages arrive before it. */
  #schedule() {
    if (this.#frame === null) this.#frame = requestAnimationFrame(() => this.#render());
  }

  /**
   * @param {string} pattern
   * @param {SubscriptionStatus} status
   */
  #onStatus(pattern, status) {
    if (!this.#statuses.has(pattern)) return; // a subscription of an earlier follow()
    this.#statuses.set(pattern, status);
    this.#showFollowing();
    if (status.state === "ended" && status.reason !== "closed") {
      this.#say(`The daemon ended the subscription to ${pattern}: ${status.reason}.`);
    } else if (status.epochChanged) {
      this.#say(`The daemon's history changed (a new store): rows below the newest replay are from the old one.`);
    } else if (status.gap) {
      this.#say(`Seqs ${status.gap[0]}–${status.gap[1]} are no longer kept (retention): they could not be replayed.`);
    }
  }

  /* --------------------------------------------------------- rendering */

  /** One animation frame: the queued batch becomes rows, newest first, in one insertion. */
  #render() {
    this.#frame = null;
    if (this.#paused) {
      this.#showCounters(); // only the "waiting" count moves
      return;
    }
    if (this.#queue.length === 0) return;
    const batch = this.#queue.length > this.maxRows ? this.#queue.slice(-this.maxRows) : this.#queue;
    this.#queue = [];
    if (this.#subs.length > 1) batch.sort((a, b) => a.envelope.seq - b.envelope.seq);
    const fragment = document.createDocumentFragment();
    for (let i = batch.length - 1; i >= 0; i--) fragment.appendChild(this.#row(batch[i]));
    if (batch.length >= this.maxRows) {
      this.tbody.replaceChildren(fragment);
    } else {
      this.tbody.prepend(fragment);
      while (this.tbody.rows.length > this.maxRows) this.tbody.lastElementChild?.remove();
    }
    this.#showCounters();
  }

  /**
   * @param {Received} received
   * @returns {HTMLTableRowElement}
   */
  #row(received) {
    const { envelope } = received;
    const row = el("tr", { "data-seq": envelope.seq },
      el("td", { className: "num" }, el("button", { type: "button", className: "link", title: "Show the whole message" },
        String(envelope.seq))),
      el("td", { className: "time" }, clockTime(envelope.timestamp)),
      el("td", { className: "type" }, envelope.type),
      el("td", { className: "payload" }, preview(envelope.payload)));
    this.#rowData.set(row, received);
    return row;
  }

  /**
   * "Following # — subscribed at seq 12" (or "resumed after seq 40" after a
   * reconnect): what the tail is attached to, and from where. `data-state` is
   * `subscribed` once every pattern's subscription is confirmed.
   */
  #showFollowing() {
    const parts = [...this.#statuses].map(([pattern, status]) => {
      if (status === null) return `${pattern} — subscribing…`;
      if (status.state === "ended") return `${pattern} — ended (${status.reason})`;
      return `${pattern} — ${status.resumed ? "resumed after" : "subscribed at"} seq ${status.lastSeq}`;
    });
    const all = [...this.#statuses.values()];
    this.following.dataset.state = all.length && all.every((s) => s?.state === "subscribed") ? "subscribed" : "pending";
    this.following.textContent = parts.length ? `Following ${parts.join("; ")}` : "Following nothing";
  }

  #showCounters() {
    const parts = [
      `${this.#received} received`,
      `${this.tbody.rows.length} shown (at most ${this.maxRows})`,
      `last seq ${this.#lastSeq ?? "—"}`,
    ];
    if (this.#paused) parts.push(`paused: ${this.#queue.length} waiting`);
    this.counters.textContent = parts.join(" · ");
  }

  /** @param {string} text */
  #say(text) {
    this.notice.textContent = text;
    this.notice.hidden = text === "";
  }

  /* ------------------------------------------------------------ detail */

  /** @param {Event} event */
  #onClick(event) {
    const row = /** @type {Element} */ (event.target).closest("tr");
    const received = row && this.#rowData.get(row);
    if (received) this.showDetail(received);
  }

  /**
   * The whole envelope in the message dialog.
   * @param {Received} received
   */
  showDetail({ envelope, pattern }) {
    const body = /** @type {HTMLElement} */ (this.detail.querySelector("[data-role=body]"));
    const title = /** @type {HTMLElement} */ (this.detail.querySelector("[data-role=title]"));
    title.textContent = `Message seq ${envelope.seq}`;
    const metadata = Object.entries(envelope.metadata ?? {});
    body.replaceChildren(
      definitionList([
        ["seq", envelope.seq],
        ["type", envelope.type],
        ["message_id", envelope.message_id],
        ["timestamp", envelope.timestamp],
        ["matched pattern", pattern],
      ]),
      el("h3", null, "Metadata"),
      metadata.length ? definitionList(metadata, "facts metadata") : el("p", null, "No metadata."),
      el("h3", null, "Payload"),
      el("pre", { className: "json" }, json(envelope.payload, 2)),
      el("h3", null, "Envelope"),
      el("pre", { className: "json envelope" }, json(envelope, 2)),
    );
    if (!this.detail.open) this.detail.showModal();
  }
}
