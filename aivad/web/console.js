// @ts-check
/**
 * The aivad web console (DESIGN §4.9): served by the daemon at `GET /console`,
 * built on the browser client `/client.js`, no build step, nothing fetched
 * from anywhere but the daemon that serves it.
 *
 * This module boots the page: it reads `/console/config.json` (where the
 * WebSocket is, whether a token is needed), gets the tab's token when one is
 * needed, connects the browser client, and routes `location.hash` to a view:
 *
 * | hash                | view                                           |
 * |---------------------|------------------------------------------------|
 * | `#/` (default)      | live tail, publish form (console-tail.js)      |
 * | `#/tasks`           | tasks by state, dispatch form (console-tasks.js) |
 * | `#/tasks/<task_id>` | one task and its attempts                      |
 * | `#/workers`         | connected workers                              |
 * | `#/dlq`, `#/dlq/<id>` | dead letters: show, replay, purge (console-dlq.js) |
 * | `#/status`          | services, rates chart, cluster (console-status.js) |
 *
 * docs/console.md is the operator's guide.
 *
 * @module aivad/console
 */

import { connect } from "/client.js";
import { Api, Auth, byId, parseJsonField } from "./console-lib.js";
import { LetterView, DlqView } from "./console-dlq.js";
import { Sampler, StatusView } from "./console-status.js";
import { LiveTail } from "./console-tail.js";
import { TasksView, TaskView, WorkersView } from "./console-tasks.js";

/** @typedef {import("/client.js").Client} Client */

/**
 * @typedef {object} View
 * @property {HTMLElement} section
 * @property {(param: string | null) => unknown} [show]
 * @property {() => void} [hide]
 * @property {() => unknown} [refresh]  Called every {@link REFRESH_MS} while shown.
 */

/** How often the shown table view asks the daemon again. */
const REFRESH_MS = 3000;

/**
 * `/console/config.json`: what the daemon tells its console.
 * @returns {Promise<{websocket_url: string, auth_required: boolean}>}
 */
async function loadConfig() {
  const response = await fetch("/console/config.json", { cache: "no-store" });
  if (!response.ok) throw new Error(`GET /console/config.json answered ${response.status}`);
  return response.json();
}

async function boot() {
  const config = await loadConfig();
  /** @type {{followDefault: () => void} | null} */
  let tail = null; // set below; a token entered before then needs no re-follow
  const auth = new Auth(config.auth_required, byId("token-dialog", HTMLDialogElement), () => onNewToken());
  if (config.auth_required) await auth.token(); // asks first: the tail's patterns come from the token
  const api = new Api(auth);
  const client = connect(config.websocket_url, {
    token: config.auth_required ? () => auth.token() : undefined,
    onStateChange: showConnection,
    onError: (error) => {
      // a refused or expired token: ask for another (the client waits for it before reconnecting)
      if (config.auth_required && /** @type {any} */ (error).code === "unauthorized") {
        auth.refused(`The daemon refused the token: ${error.message}`);
      } else {
        console.warn("aivad console:", error);
      }
    },
  });

  tail = startTail(client, auth);
  wirePublishForm(client);
  const status = new StatusView(new Sampler(api, () => status.render()));
  status.sampler.start();
  /** @type {Record<string, View>} */
  const views = {
    tail: { section: byId("view-tail", HTMLElement) },
    tasks: new TasksView(api, client),
    task: new TaskView(api),
    workers: new WorkersView(api),
    dlq: new DlqView(api),
    letter: new LetterView(api),
    status,
  };
  showIdentity(auth);
  startRouter(views);

  /** A new token after a refusal may grant other patterns: follow what it may see. */
  function onNewToken() {
    showIdentity(auth);
    tail?.followDefault();
  }
}

/* ------------------------------------------------------------ live tail */

/**
 * The tail, its filter and pause button. With no pattern typed it follows
 * everything the token may see: `#` without a token or with `admin`, else
 * each pattern of its `subscribe` grant.
 * @param {Client} client
 * @param {Auth} auth
 */
function startTail(client, auth) {
  const tail = new LiveTail(client, {
    tbody: byId("tail-rows", HTMLTableSectionElement),
    following: byId("tail-following", HTMLElement),
    counters: byId("tail-counters", HTMLElement),
    notice: byId("tail-notice", HTMLElement),
    detail: byId("message-dialog", HTMLDialogElement),
  });
  const input = byId("tail-pattern", HTMLInputElement);
  const followDefault = () => {
    const patterns = auth.claims().subscribe;
    input.value = "";
    input.placeholder = patterns.join(" ") || "nothing";
    tail.follow(patterns);
  };
  byId("tail-filter", HTMLFormElement).addEventListener("submit", (event) => {
    event.preventDefault();
    const pattern = input.value.trim();
    if (pattern === "") followDefault();
    else tail.follow([pattern]);
  });
  const pause = byId("tail-pause", HTMLButtonElement);
  pause.addEventListener("click", () => {
    tail.setPaused(!tail.paused);
    pause.textContent = tail.paused ? "Resume" : "Pause";
    pause.setAttribute("aria-pressed", String(tail.paused));
  });
  followDefault();
  return { followDefault };
}

/**
 * The publish form: through the browser client (the WebSocket `publish` op).
 * @param {Client} client
 */
function wirePublishForm(client) {
  const form = byId("publish-form", HTMLFormElement);
  const output = byId("publish-result", HTMLOutputElement);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const field = (/** @type {string} */ name) => String(data.get(name) ?? "");
    try {
      const payload = parseJsonField(field("payload"), "the payload", null);
      const metadata = parseJsonField(field("metadata"), "the metadata", undefined);
      const messageId = field("message_id").trim() || undefined;
      output.textContent = "publishing…";
      const { seq, duplicate } = await client.publish(field("type").trim(), payload, { metadata, messageId });
      output.textContent = duplicate ? `Duplicate: already stored as seq ${seq}.` : `Stored as seq ${seq}.`;
    } catch (error) {
      output.textContent = `Not published: ${/** @type {Error} */ (error).message}`;
    }
  });
}

/* -------------------------------------------------------------- routing */

/**
 * `#/tasks/abc` → `["task", "abc"]`; anything unknown → the tail.
 * @param {string} hash
 * @returns {[string, string | null]}
 */
function route(hash) {
  const [name = "", param] = hash.replace(/^#\/?/, "").split("/");
  const decoded = param === undefined || param === "" ? null : decodeURIComponent(param);
  if (name === "tasks" && decoded !== null) return ["task", decoded];
  if (name === "dlq" && decoded !== null) return ["letter", decoded];
  if (["tasks", "workers", "dlq", "status"].includes(name)) return [name, null];
  return ["tail", null];
}

/** @param {Record<string, View>} views */
function startRouter(views) {
  /** @type {View | null} */
  let current = null;
  const navigate = () => {
    const [name, param] = route(location.hash);
    const view = views[name];
    if (current && current !== view) {
      current.hide?.();
      current.section.hidden = true;
    }
    current = view;
    view.section.hidden = false;
    view.show?.(param);
    const top = { task: "tasks", letter: "dlq" }[name] ?? name;
    for (const link of document.querySelectorAll("[data-nav]")) {
      if (link.getAttribute("data-nav") === top) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  };
  addEventListener("hashchange", navigate);
  setInterval(() => {
    if (!document.hidden) current?.refresh?.();
  }, REFRESH_MS);
  navigate();
}

/* ------------------------------------------------------------- header */

/**
 * @param {import("/client.js").ConnectionState} state
 * @param {import("/client.js").StateDetail} detail
 */
function showConnection(state, detail) {
  const line = byId("connection", HTMLElement);
  line.dataset.state = state;
  if (state === "open") line.textContent = "live";
  else if (state === "connecting") line.textContent = detail.attempt ? `connecting (attempt ${detail.attempt + 1})…` : "connecting…";
  else if (state === "disconnected") {
    const retry = detail.retryInMs === undefined ? "" : `, retrying in ${(detail.retryInMs / 1000).toFixed(1)} s`;
    line.textContent = `disconnected (${detail.reason || detail.code || "connection lost"})${retry}`;
  } else line.textContent = "closed";
}

/** @param {Auth} auth */
function showIdentity(auth) {
  const identity = byId("identity", HTMLElement);
  const forget = byId("forget-token", HTMLButtonElement);
  if (!auth.required) return;
  const claims = auth.claims();
  identity.textContent = `token: ${claims.sub ?? "?"}${claims.admin ? " (admin)" : ""}`;
  identity.hidden = false;
  forget.hidden = false;
  forget.onclick = () => {
    auth.forget();
    location.reload(); // the open connection keeps the old identity: start over
  };
}

boot().catch((error) => {
  const line = byId("boot-error", HTMLElement);
  line.textContent = `The console could not start: ${error.message}`;
  line.hidden = false;
});
