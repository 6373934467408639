// @ts-check
/**
 * Status (`#/status`): the daemon's services, its rates over the last minutes
 * and, when clustered, the nodes — from `/api/status`.
 *
 * The daemon keeps no time series, so the page makes its own: a sampler asks
 * for `status` every few seconds from the moment the console opens (not only
 * while this view is shown, so the chart has minutes behind it when the
 * operator looks), keeps a bounded window of samples, and the chart plots the
 * differences between consecutive samples of counters the daemon already
 * has: messages stored (`store.last_seq`) and deliveries (`router.deliveries`).
 *
 * @module aivad/console-status
 */

import { ApiError, byId, dateTime, definitionList, el, show, uptime } from "./console-lib.js";
import { showError } from "./console-tasks.js";

/** @typedef {import("./console-lib.js").Api} Api */

const SVG = "http://www.w3.org/2000/svg";

/**
 * @typedef {object} Sample
 * @property {number} at          `Date.now()` when the reply came.
 * @property {number} uptime      The daemon's uptime (s): a smaller one means it restarted.
 * @property {number} stored      `store.last_seq`
 * @property {number} deliveries  `router.deliveries`
 */

/** @typedef {{at: number, stored: number, delivered: number}} Rate  per second, between two samples */

/** Samples `/api/status` periodically and keeps the last `keep` of them. */
export class Sampler {
  /** @type {Sample[]} */
  samples = [];
  /** @type {any} */
  latest = null;
  /** @type {unknown} */
  error = null;
  #timer = /** @type {ReturnType<typeof setTimeout> | undefined} */ (undefined);
  #stopped = false;

  /**
   * @param {Api} api
   * @param {(sampler: Sampler) => void} onSample  After every reply (or error).
   * @param {{intervalMs?: number, keep?: number}} [options]  Default: every 2 s for 5 minutes.
   */
  constructor(api, onSample, { intervalMs = 2000, keep = 150 } = {}) {
    this.api = api;
    this.onSample = onSample;
    this.intervalMs = intervalMs;
    this.keep = keep;
  }

  /** Sample now, then every `intervalMs` after each reply (never two requests at once). */
  start() {
    this.#stopped = false;
    clearTimeout(this.#timer);
    this.#tick();
  }

  stop() {
    this.#stopped = true;
    clearTimeout(this.#timer);
  }

  async #tick() {
    try {
      const { status } = await this.api.call("status");
      this.latest = status;
      this.error = null;
      this.#add(status);
    } catch (error) {
      this.error = error;
      // without the admin right every later sample is refused as well
      if (error instanceof ApiError && error.status === 403) this.#stopped = true;
    }
    this.onSample(this);
    if (!this.#stopped) this.#timer = setTimeout(() => this.#tick(), this.intervalMs);
  }

  /** @param {any} status */
  #add(status) {
    this.samples.push({
      at: Date.now(),
      uptime: Number(status.uptime_s ?? 0),
      stored: Number(messageLog(status)?.last_seq ?? 0),
      deliveries: Number(status.router?.deliveries ?? 0),
    });
    if (this.samples.length > this.keep) this.samples.splice(0, this.samples.length - this.keep);
  }

  /**
   * Rates between consecutive samples; a pair across a daemon restart (its
   * counters start again) gives no point.
   * @returns {Rate[]}
   */
  rates() {
    /** @type {Rate[]} */
    const rates = [];
    for (let i = 1; i < this.samples.length; i++) {
      const [a, b] = [this.samples[i - 1], this.samples[i]];
      const seconds = (b.at - a.at) / 1000;
      if (seconds <= 0 || b.uptime < a.uptime || b.stored < a.stored || b.deliveries < a.deliveries) continue;
      rates.push({ at: b.at, stored: (b.stored - a.stored) / seconds, delivered: (b.deliveries - a.deliveries) / seconds });
    }
    return rates;
  }
}

export class StatusView {
  /** @param {Sampler} sampler */
  constructor(sampler) {
    this.sampler = sampler;
    this.section = byId("view-status", HTMLElement);
    this.summary = byId("status-summary", HTMLElement);
    this.chart = byId("status-chart", HTMLElement);
    this.cluster = byId("status-cluster", HTMLElement);
    this.services = byId("status-services", HTMLElement);
    this.visible = false;
  }

  show() {
    this.visible = true;
    this.render();
  }

  hide() {
    this.visible = false;
  }

  /** Called by the sampler after each sample: redraw only while shown. */
  render() {
    if (!this.visible) return;
    const { latest: status, error } = this.sampler;
    showError(this.section, error);
    if (status === null) return;
    this.summary.replaceChildren(summary(status));
    this.chart.replaceChildren(chart(this.sampler.rates(), this.sampler.keep * this.sampler.intervalMs));
    this.cluster.replaceChildren(...clusterNodes(status.cluster));
    this.services.replaceChildren(...services(status));
  }
}

/**
 * Where the daemon's messages live, for their seq: the cluster's Redis log when
 * clustered (DESIGN §5), else the embedded store.
 * @param {any} status
 */
function messageLog(status) {
  return status.cluster ?? status.store;
}

/**
 * The facts an operator looks at first.
 * @param {any} status
 */
function summary(status) {
  const tasks = status.tasks?.tasks_by_state ?? {};
  return definitionList([
    ["ready", status.ready ? "yes" : `no: ${(status.not_ready_because ?? []).join("; ")}`],
    ["draining", status.draining ? "yes" : "no"],
    ["version", status.version],
    ["uptime", typeof status.uptime_s === "number" ? uptime(status.uptime_s) : null],
    ["last seq", messageLog(status)?.last_seq],
    ["messages kept", status.cluster ? null : status.store?.stored_messages],
    ["ingest rate", status.ingest ? `${status.ingest.rate_10s}/s (10 s) · ${status.ingest.rate_60s}/s (1 min)` : null],
    // an enabled bridge reports its statistics; a disabled one only {"enabled": false}
    ["AMQP", brokerState(status.amqp && status.amqp.enabled !== false, status.amqp?.connected === true,
      status.amqp?.last_error)],
    ["Redis", brokerState(status.cluster !== undefined, !status.cluster?.failure, status.cluster?.failure)],
    ["connections", status.websocket?.connections],
    ["subscriptions", status.router?.subscriptions],
    ["tasks", Object.entries(tasks).map(([state, n]) => `${state} ${n}`).join(" · ")],
    ["workers", status.tasks?.workers],
  ], "facts summary");
}

/**
 * "off", "connected" or "not connected (why)": the AMQP bridge's and the Redis log's state.
 * @param {unknown} enabled
 * @param {boolean} connected
 * @param {unknown} failure
 */
function brokerState(enabled, connected, failure) {
  if (!enabled) return "off";
  if (connected) return "connected";
  return failure ? `not connected (${failure})` : "not connected";
}

/**
 * One box per service section of the status (websocket, store, amqp, redis, …):
 * every field the daemon reports, so a new field shows without a console change.
 * @param {any} status
 */
function services(status) {
  return Object.entries(status)
    .filter(([name, value]) => value !== null && typeof value === "object" && !Array.isArray(value) && name !== "cluster")
    .map(([name, value]) =>
      el("section", { className: "service", "data-service": name, "aria-label": name },
        el("h3", null, name),
        definitionList(Object.entries(/** @type {Record<string, unknown>} */ (value)))));
}

/**
 * The cluster (DESIGN §5), when the status has a `cluster` section: its own
 * facts (this node's name, the log's epoch and last seq, a Redis failure),
 * then one row per live node, this node's marked. Columns are whatever fields
 * the nodes have, so a field added to the heartbeat shows without a console change.
 * @param {any} cluster
 * @returns {Node[]}
 */
function clusterNodes(cluster) {
  if (cluster === null || typeof cluster !== "object") return [];
  const { nodes: raw = [], ...facts } = cluster;
  /** @type {Record<string, unknown>[]} */
  const nodes = Array.isArray(raw) ? raw : Object.entries(raw).map(([name, info]) => ({ name, ...(/** @type {object} */ (info)) }));
  const columns = [...new Set(nodes.flatMap((n) => Object.keys(n)))];
  const nameOf = (/** @type {Record<string, unknown>} */ n) => n.node_name ?? n.name ?? n.node;
  return [
    el("h3", null, "Cluster"),
    definitionList(Object.entries(facts), "facts cluster-facts"),
    el("p", null, `${nodes.length} live node${nodes.length === 1 ? "" : "s"}; this one is ${show(cluster.node_name)}.`),
    el("table", { className: "grid cluster" },
      el("thead", null, el("tr", null, columns.map((c) => el("th", { scope: "col" }, c)))),
      el("tbody", null, nodes.map((n) => el("tr", {
        "data-node": show(nameOf(n)),
        className: nameOf(n) === cluster.node_name ? "self" : null,
      }, columns.map((c) => el("td", null, c === "last_seen" ? dateTime(/** @type {any} */ (n[c])) : show(formatCell(n[c])))))))),
  ];
}

/** @param {unknown} value */
function formatCell(value) {
  return value !== null && typeof value === "object" ? JSON.stringify(value) : value;
}

/* --------------------------------------------------------------- chart */

/**
 * A small SVG line chart of the rates: stored and delivered messages per second
 * over the sampler's window, newest at the right. The figure's text says the
 * same numbers for screen readers.
 * @param {Rate[]} rates
 * @param {number} windowMs
 */
function chart(rates, windowMs) {
  const [width, height, left, bottom, top] = [640, 160, 48, 20, 8];
  const end = Date.now();
  const peak = niceCeiling(Math.max(1, ...rates.map((r) => Math.max(r.stored, r.delivered))));
  const x = (/** @type {number} */ at) => left + ((at - (end - windowMs)) / windowMs) * (width - left);
  const y = (/** @type {number} */ v) => top + (1 - v / peak) * (height - top - bottom);
  const last = rates.at(-1);
  const label = last
    ? `Now ${last.stored.toFixed(1)} messages stored/s and ${last.delivered.toFixed(1)} deliveries/s; peak scale ${peak}/s`
    : "Collecting samples…";
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label,
    class: "rates", "data-points": rates.length });
  svg.append(
    svgEl("line", { x1: left, y1: y(0), x2: width, y2: y(0), class: "axis" }),
    svgEl("line", { x1: left, y1: y(peak), x2: width, y2: y(peak), class: "grid-line" }),
    svgText(left - 4, y(peak) + 4, `${peak}/s`, "end"),
    svgText(left - 4, y(0) + 4, "0", "end"),
    svgText(left, height - 4, `−${Math.round(windowMs / 60000)} min`, "start"),
    svgText(width, height - 4, "now", "end"),
    polyline(rates.map((r) => [x(r.at), y(r.stored)]), "series stored"),
    polyline(rates.map((r) => [x(r.at), y(r.delivered)]), "series delivered"),
  );
  const legend = el("p", { className: "legend" },
    el("span", { className: "key stored" }, "stored/s"), " ", el("span", { className: "key delivered" }, "deliveries/s"),
    ` — ${label}.`);
  return el("div", null, svg, legend);
}

/**
 * @param {number[][]} points
 * @param {string} className
 */
function polyline(points, className) {
  return svgEl("polyline", { points: points.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" "), class: className });
}

/**
 * @param {number} px
 * @param {number} py
 * @param {string} text
 * @param {string} anchor
 */
function svgText(px, py, text, anchor) {
  const node = svgEl("text", { x: px, y: py, "text-anchor": anchor });
  node.textContent = text;
  return node;
}

/**
 * @param {string} tag
 * @param {Record<string, string | number>} attributes
 */
function svgEl(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

/** 1, 2, 5 × 10^n at or above `value`: a scale that reads well. @param {number} value */
function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}
