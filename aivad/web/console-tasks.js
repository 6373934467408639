// @ts-check
/**
 * Tasks (`#/tasks`, `#/tasks/<task_id>`) and workers (`#/workers`): what the
 * dispatcher holds, read with `/api/tasks`, `/api/task` and `/api/workers`.
 *
 * @module aivad/console-tasks
 */

import {
  ApiError, append, brief, byId, clockTime, dateTime, definitionList, duration, el, fillTable, json, parseJsonField,
  preview, show,
} from "./console-lib.js";

/** @typedef {import("./console-lib.js").Api} Api */
/** @typedef {import("/client.js").Client} Client */

/**
 * What every data view does with an error: say it in its alert line. A 403
 * means the token lacks `admin`, which these views need (DESIGN §4.9).
 * @param {HTMLElement} section
 * @param {unknown} error  null clears it.
 */
export function showError(section, error) {
  const line = /** @type {HTMLElement} */ (section.querySelector("[data-role=error]"));
  if (error === null) {
    line.hidden = true;
    return;
  }
  const forbidden = error instanceof ApiError && error.status === 403;
  line.textContent = forbidden
    ? "This view needs a token with the admin right."
    : `Could not load: ${/** @type {Error} */ (error).message}`;
  line.hidden = false;
}

/**
 * Calls `render` only when the reply differs from the last one rendered, so a
 * periodic refresh does not rebuild a table (and lose the operator's focus)
 * when nothing changed.
 */
export class Latest {
  #last = "";

  /**
   * @param {unknown} reply
   * @param {() => void} render
   */
  render(reply, render) {
    const text = json(reply);
    if (text === this.#last) return;
    this.#last = text;
    render();
  }

  forget() {
    this.#last = "";
  }
}

/** A link to one task's page. @param {string} taskId */
export function taskLink(taskId) {
  return el("a", { href: `#/tasks/${encodeURIComponent(taskId)}`, className: "mono" }, taskId);
}

/**
 * The attempts table of a task or a dead letter (the daemon's `history` entries).
 * @param {HTMLTableSectionElement} tbody
 * @param {unknown} attempts
 */
export function fillAttempts(tbody, attempts) {
  const rows = (Array.isArray(attempts) ? attempts : []).map((/** @type {any} */ a) =>
    el("tr", null,
      el("td", { className: "num" }, show(a.attempt)),
      el("td", null, show(a.worker)),
      el("td", { className: "time", title: dateTime(a.started) }, typeof a.started === "string" ? clockTime(a.started) : "—"),
      el("td", { className: "time", title: dateTime(a.ended) }, typeof a.ended === "string" ? clockTime(a.ended) : "—"),
      el("td", { className: "num" }, duration(a.started, a.ended)),
      el("td", { className: `state ${String(a.outcome ?? "")}` }, show(a.outcome)),
      el("td", { className: "error-text" }, a.error === undefined ? "" : brief(a.error, 400))));
  fillTable(tbody, rows, "No attempt yet.");
}

/* ------------------------------------------------------------- tasks */

export class TasksView {
  #latest = new Latest();

  /**
   * @param {Api} api
   * @param {Client} client
   */
  constructor(api, client) {
    this.api = api;
    this.client = client;
    this.section = byId("view-tasks", HTMLElement);
    this.state = byId("tasks-state", HTMLSelectElement);
    this.tbody = byId("tasks-rows", HTMLTableSectionElement);
    this.counts = byId("tasks-counts", HTMLElement);
    byId("tasks-filter", HTMLFormElement).addEventListener("submit", (event) => {
      event.preventDefault();
      this.refresh();
    });
    this.state.addEventListener("change", () => this.refresh());
    const form = byId("dispatch-form", HTMLFormElement);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.#dispatch(form);
    });
  }

  show() {
    this.#latest.forget();
    return this.refresh();
  }

  async refresh() {
    const state = this.state.value;
    try {
      const [{ tasks }, { status }] = await Promise.all([
        this.api.call("tasks", state ? { state, limit: 200 } : { limit: 200 }),
        this.api.call("status"),
      ]);
      showError(this.section, null);
      this.#latest.render({ tasks, state, counts: status.tasks?.tasks_by_state }, () => {
        this.#showCounts(status.tasks?.tasks_by_state ?? {});
        fillTable(this.tbody, tasks.map((/** @type {any} */ t) => this.#row(t)),
          state ? `No task is ${state}.` : "No task yet.");
      });
    } catch (error) {
      showError(this.section, error);
    }
  }

  /** @param {Record<string, number>} byState */
  #showCounts(byState) {
    const parts = Object.entries(byState).map(([state, n]) => `${state} ${n}`);
    this.counts.textContent = parts.length ? `Tasks held: ${parts.join(" · ")}` : "";
  }

  /** @param {any} task */
  #row(task) {
    const outcome = task.state === "completed" ? preview(task.result) : task.error == null ? "" : brief(task.error);
    return el("tr", { "data-task-id": task.task_id },
      el("td", null, taskLink(task.task_id)),
      el("td", { className: "type" }, task.type),
      el("td", { className: `state ${task.state}` }, task.state),
      el("td", { className: "num" }, show(task.attempts)),
      el("td", { className: task.state === "completed" ? "payload" : "error-text" }, outcome));
  }

  /**
   * The dispatch form: through the browser client (the WebSocket `dispatch` op).
   * @param {HTMLFormElement} form
   */
  async #dispatch(form) {
    const output = byId("dispatch-result", HTMLOutputElement);
    const field = (/** @type {string} */ name) => String(new FormData(form).get(name) ?? "");
    try {
      const payload = parseJsonField(field("payload"), "the payload", null);
      /** @type {import("/client.js").DispatchOptions} */
      const options = {
        priority: /** @type {any} */ (field("priority") || "normal"),
        retryPolicy: { maxAttempts: Number(field("max_attempts") || 3) },
        timeout: Number(field("timeout") || 300),
      };
      output.textContent = "dispatching…";
      const { taskId } = await this.client.dispatch(field("type").trim(), payload, options);
      output.replaceChildren("Queued as task ", taskLink(taskId));
      this.refresh();
    } catch (error) {
      output.textContent = `Not dispatched: ${/** @type {Error} */ (error).message}`;
    }
  }
}

/* --------------------------------------------------------- one task */

export class TaskView {
  #latest = new Latest();
  /** @type {string | null} */
  #taskId = null;

  /** @param {Api} api */
  constructor(api) {
    this.api = api;
    this.section = byId("view-task", HTMLElement);
    this.title = byId("task-title", HTMLElement);
    this.facts = byId("task-facts", HTMLElement);
    this.attempts = byId("task-attempts", HTMLTableSectionElement);
    this.values = byId("task-values", HTMLElement);
  }

  /** @param {string | null} taskId */
  show(taskId) {
    this.#taskId = taskId;
    this.#latest.forget();
    this.title.textContent = `Task ${taskId ?? ""}`;
    this.facts.replaceChildren();
    this.values.replaceChildren();
    this.attempts.replaceChildren();
    return this.refresh();
  }

  async refresh() {
    if (this.#taskId === null) return;
    try {
      const { task } = await this.api.call("task", { task_id: this.#taskId });
      showError(this.section, null);
      this.#latest.render(task, () => this.#render(task));
    } catch (error) {
      showError(this.section, error);
    }
  }

  /** @param {any} task */
  #render(task) {
    const spec = task.spec ?? {};
    this.facts.replaceChildren(definitionList([
      ["type", task.type],
      ["state", task.state],
      ["attempts", `${task.attempts} of ${show(spec.max_attempts)}`],
      ["priority", spec.priority],
      ["timeout per attempt", spec.timeout_s === undefined ? null : `${spec.timeout_s} s`],
      ["group", task.group_id],
      ["affinity key", spec.affinity_key],
    ]));
    fillAttempts(this.attempts, task.history);
    this.values.replaceChildren();
    append(this.values, [
      el("h3", null, "Payload"), el("pre", { className: "json" }, json(spec.payload, 2)),
      task.state === "completed" ? el("h3", null, "Result") : null,
      task.state === "completed" ? el("pre", { className: "json" }, json(task.result, 2)) : null,
      task.error == null ? null : el("h3", null, "Error"),
      task.error == null ? null : el("pre", { className: "json error-text" }, brief(task.error, 10_000)),
    ]);
  }
}

/* ------------------------------------------------------------ workers */

export class WorkersView {
  #latest = new Latest();

  /** @param {Api} api */
  constructor(api) {
    this.api = api;
    this.section = byId("view-workers", HTMLElement);
    this.tbody = byId("workers-rows", HTMLTableSectionElement);
  }

  show() {
    this.#latest.forget();
    return this.refresh();
  }

  async refresh() {
    try {
      const { workers } = await this.api.call("workers");
      showError(this.section, null);
      this.#latest.render(workers, () => fillTable(this.tbody, workers.map(workerRow), "No worker is connected."));
    } catch (error) {
      showError(this.section, error);
    }
  }
}

/** @param {any} w */
function workerRow(w) {
  return el("tr", { "data-worker-id": w.worker_id },
    el("td", { title: `worker id ${w.worker_id}` }, w.name),
    el("td", { className: "type" }, (w.types ?? []).join(", ")),
    el("td", { className: "num" }, show(w.concurrency)),
    el("td", { className: "num" }, show(w.in_flight)),
    el("td", { className: "num" }, show(w.done)),
    el("td", { className: "num" }, show(w.failed)),
    el("td", null, dateTime(w.connected_since)),
    el("td", null, w.draining ? "yes" : "no"));
}
