// @ts-check
/**
 * What every view of the console shares: safe DOM building, formatting, the
 * HTTP API (`POST /api/<command>`), and the tab's token.
 *
 * Safety rule of the whole console: message payloads, metadata, task errors
 * and dead-letter bodies are written by whoever can publish — attacker
 * controlled. They only ever reach the page as text (`textContent`, text
 * nodes, attribute values set one by one); nothing here parses HTML.
 *
 * @module aivad/console-lib
 */

/* ------------------------------------------------------------------ DOM */

/**
 * @typedef {string | number | boolean | null | undefined | Node} Child
 *   Strings and numbers become text nodes; null, undefined and booleans are skipped.
 */

/**
 * Create an element: `el("td", {className: "num"}, 42)`.
 *
 * Properties are set as DOM properties (`className`, `type`, `hidden`, `onclick`),
 * except keys with a dash (`aria-*`, `data-*`), which are attributes. Children
 * are text or nodes — never markup.
 *
 * @template {keyof HTMLElementTagNameMap} K
 * @param {K} tag
 * @param {Record<string, unknown> | null} [props]
 * @param {...(Child | Child[])} children
 * @returns {HTMLElementTagNameMap[K]}
 */
export function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null) continue;
    if (key.includes("-")) node.setAttribute(key, String(value));
    else /** @type {any} */ (node)[key] = value;
  }
  append(node, children);
  return node;
}

/**
 * Append text or nodes to `parent` (arrays are flattened).
 * @param {Node} parent
 * @param {(Child | Child[])[]} children
 */
export function append(parent, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || typeof child === "boolean") continue;
    parent.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/**
 * The element with `id`, typed; throws when the page lacks it (a bug in console.html).
 * @template {HTMLElement} T
 * @param {string} id
 * @param {new (...args: any[]) => T} type
 * @returns {T}
 */
export function byId(id, type) {
  const node = document.getElementById(id);
  if (!(node instanceof type)) throw new Error(`console.html has no <${type.name}> #${id}`);
  return node;
}

/**
 * A table body's new rows, replacing the old ones in one DOM operation.
 * @param {HTMLTableSectionElement} tbody
 * @param {HTMLTableRowElement[]} rows
 * @param {string} emptyText  Shown in one row spanning the table when there are no rows.
 */
export function fillTable(tbody, rows, emptyText) {
  if (rows.length === 0) {
    const columns = tbody.parentElement?.querySelectorAll("thead th").length ?? 1;
    tbody.replaceChildren(el("tr", { className: "empty" }, el("td", { colSpan: columns }, emptyText)));
    return;
  }
  tbody.replaceChildren(...rows);
}

/**
 * A `<dl>` of label → value pairs: a node (a link) as it is, another object as JSON, a scalar as text.
 * @param {[string, unknown][]} pairs
 * @param {string} [className]
 */
export function definitionList(pairs, className = "facts") {
  const dl = el("dl", { className });
  for (const [label, value] of pairs) {
    const shown = value instanceof Node ? value : typeof value === "object" && value !== null ? json(value) : show(value);
    append(dl, [el("dt", null, label), el("dd", null, shown)]);
  }
  return dl;
}

/* ----------------------------------------------------------- formatting */

/**
 * Compact JSON, cut to `max` characters (payload previews in tables).
 * @param {unknown} value
 * @param {number} [max]
 */
export function preview(value, max = 160) {
  const text = json(value);
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

/**
 * A string as it is, anything else as compact JSON; cut to `max` characters (error columns:
 * a worker's error is usually a sentence, sometimes an object).
 * @param {unknown} value
 * @param {number} [max]
 */
export function brief(value, max = 160) {
  if (typeof value !== "string") return preview(value, max);
  return value.length > max ? `${value.slice(0, max - 1)}…` : value;
}

/**
 * JSON text for display; never throws.
 * @param {unknown} value
 * @param {number} [indent]
 */
export function json(value, indent = 0) {
  try {
    return JSON.stringify(value, null, indent) ?? String(value);
  } catch {
    return String(value);
  }
}

/**
 * A scalar for display: "—" for null/undefined.
 * @param {unknown} value
 */
export function show(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

/**
 * `HH:MM:SS.mmm` of an RFC 3339 timestamp, in the browser's time zone (the table's time column).
 * @param {string} timestamp
 */
export function clockTime(timestamp) {
  const date = new Date(timestamp);
  if (Number.isNaN(date.getTime())) return show(timestamp);
  const pad = (/** @type {number} */ n, width = 2) => String(n).padStart(width, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

/**
 * A readable local date and time from epoch seconds or an RFC 3339 string.
 * @param {number | string | null | undefined} when
 */
export function dateTime(when) {
  if (when === null || when === undefined) return "—";
  const date = typeof when === "number" ? new Date(when * 1000) : new Date(when);
  return Number.isNaN(date.getTime()) ? String(when) : date.toLocaleString();
}

/**
 * Milliseconds between two RFC 3339 timestamps, as "12 ms" / "3.4 s"; "—" when one is missing.
 * @param {unknown} start
 * @param {unknown} end
 */
export function duration(start, end) {
  if (typeof start !== "string" || typeof end !== "string") return "—";
  const ms = Date.parse(end) - Date.parse(start);
  if (!Number.isFinite(ms)) return "—";
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

/**
 * Seconds as "3 d 4 h", "5 min 2 s", "12 s".
 * @param {number} seconds
 */
export function uptime(seconds) {
  const s = Math.floor(seconds);
  if (s >= 86400) return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  if (s >= 3600) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  if (s >= 60) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${s} s`;
}

/**
 * Parse a form field as JSON; an empty field is `fallback`.
 * @param {string} text
 * @param {string} what  Named in the error.
 * @param {unknown} fallback
 */
export function parseJsonField(text, what, fallback) {
  if (text.trim() === "") return fallback;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${what} is not valid JSON: ${/** @type {Error} */ (error).message}`);
  }
}

/* ------------------------------------------------------------------ API */

/** An HTTP API error: the daemon's `{"ok": false, "error": {code, message}}` and the HTTP status. */
export class ApiError extends Error {
  /**
   * @param {number} status
   * @param {string} code
   * @param {string} message
   */
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

/**
 * `POST /api/<command>` with the tab's token. A 401 forgets the token and asks
 * for another one (once per call), so an expired token costs the operator a
 * prompt, not a broken page.
 */
export class Api {
  /** @param {Auth} auth */
  constructor(auth) {
    this.auth = auth;
  }

  /**
   * @param {string} command  e.g. `status`, `dlq.replay`
   * @param {Record<string, unknown>} [body]
   * @returns {Promise<any>}  The reply's fields (`ok` included).
   * @throws {ApiError}
   */
  async call(command, body = {}) {
    for (let attempt = 0; ; attempt++) {
      const token = this.auth.required ? await this.auth.token() : null;
      /** @type {Record<string, string>} */
      const headers = { "content-type": "application/json" };
      if (token) headers.authorization = `Bearer ${token}`;
      let response;
      try {
        response = await fetch(`/api/${command}`, { method: "POST", headers, body: JSON.stringify(body) });
      } catch (error) {
        throw new ApiError(0, "unreachable", `the daemon did not answer: ${/** @type {Error} */ (error).message}`);
      }
      const reply = await response.json().catch(() => null);
      if (response.ok && reply?.ok === true) return reply;
      const error = new ApiError(response.status, String(reply?.error?.code ?? "internal"),
        String(reply?.error?.message ?? response.statusText));
      if (response.status === 401 && this.auth.required && attempt === 0) {
        this.auth.refused(`The daemon refused the token: ${error.message}`);
        continue;
      }
      throw error;
    }
  }
}

/* --------------------------------------------------------------- tokens */

const TOKEN_KEY = "aivad.console.token";

/**
 * @typedef {object} Claims  What the console reads from a token (for display and
 *   the tail's default patterns; the daemon verifies, the console only reads).
 * @property {string | null} sub
 * @property {boolean} admin
 * @property {string[]} subscribe  Patterns the token may subscribe to.
 * @property {number | null} exp   Epoch seconds.
 */

/**
 * The tab's token: kept in `sessionStorage` (this tab only, gone when it
 * closes), asked for with the token dialog when the daemon requires one.
 */
export class Auth {
  /** @type {Promise<string> | null} */
  #asking = null;
  /** @type {(token: string) => void} */
  #answer = () => {};

  /**
   * @param {boolean} required  From `/console/config.json`.
   * @param {HTMLDialogElement} dialog  The token dialog (a form with a `token` field).
   * @param {() => void} onChange  Called when a new token was entered or the token forgotten.
   */
  constructor(required, dialog, onChange) {
    this.required = required;
    this.dialog = dialog;
    this.onChange = onChange;
    const form = /** @type {HTMLFormElement} */ (dialog.querySelector("form"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const field = /** @type {HTMLTextAreaElement} */ (form.elements.namedItem("token"));
      const token = field.value.trim();
      if (token === "") return;
      field.value = "";
      this.#store(token);
    });
    dialog.addEventListener("cancel", (event) => event.preventDefault()); // Esc: nothing works without a token
  }

  /** The stored token, if any (without asking). */
  get current() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch {
      return null; // storage disabled: the token lives only while the dialog's answer does
    }
  }

  /**
   * The token; asks the operator when there is none. The browser client's
   * token function: it waits for the answer before opening a socket.
   * @returns {Promise<string>}
   */
  async token() {
    return this.current ?? this.#ask("");
  }

  /**
   * The daemon refused the token: forget it and ask again, saying why.
   * @param {string} why
   */
  refused(why) {
    this.#forget();
    this.#ask(why);
  }

  /** The operator asked to forget the token (the "Forget token" button: the page reloads then). */
  forget() {
    this.#forget();
  }

  /** @returns {Claims} */
  claims() {
    return readClaims(this.required ? this.current : null);
  }

  /** @param {string} why */
  #ask(why) {
    const message = /** @type {HTMLElement} */ (this.dialog.querySelector("[data-role=error]"));
    // a caller that only needs a token (a reconnect, an API call) must not wipe the reason on show
    if (why !== "" || !this.dialog.open) {
      message.textContent = why;
      message.hidden = why === "";
    }
    if (!this.dialog.open) this.dialog.showModal();
    this.#asking ??= new Promise((resolve) => {
      this.#answer = resolve;
    });
    return this.#asking;
  }

  /** @param {string} token */
  #store(token) {
    try {
      sessionStorage.setItem(TOKEN_KEY, token);
    } catch {
      // storage disabled: the token still answers the waiting callers below
    }
    this.dialog.close();
    const answer = this.#answer;
    this.#asking = null;
    answer(token);
    this.onChange();
  }

  #forget() {
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // nothing stored
    }
  }
}

/**
 * The claims of a JWT, read without verifying it (the daemon verifies). A
 * missing or unreadable token reads as anonymous with every right, which is
 * what the daemon grants when it does not require tokens.
 * @param {string | null} token
 * @returns {Claims}
 */
export function readClaims(token) {
  /** @type {Claims} */
  const anonymous = { sub: null, admin: true, subscribe: ["#"], exp: null };
  if (!token) return anonymous;
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const payload = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
    const rights = payload?.aivad ?? {};
    const admin = rights.admin === true;
    const subscribe = Array.isArray(rights.subscribe) ? rights.subscribe.filter((p) => typeof p === "string") : [];
    return {
      sub: typeof payload.sub === "string" ? payload.sub : null,
      admin,
      subscribe: admin ? ["#"] : subscribe,
      exp: typeof payload.exp === "number" ? payload.exp : null,
    };
  } catch {
    return { sub: null, admin: false, subscribe: [], exp: null }; // not a JWT: the daemon will say so
  }
}
