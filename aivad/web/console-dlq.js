// @ts-check
/**
 * The dead-letter queue (`#/dlq`, `#/dlq/<id>`): list, show, replay, purge.
 *
 * Purge deletes every dead letter and cannot be undone, so it goes through a
 * confirmation dialog whose default button is Cancel; the API itself also
 * refuses a purge without `{"yes": true}`.
 *
 * @module aivad/console-dlq
 */

import { byId, dateTime, definitionList, el, fillTable, json, show } from "./console-lib.js";
import { fillAttempts, Latest, showError, taskLink } from "./console-tasks.js";

/** @typedef {import("./console-lib.js").Api} Api */

/** Letters listed at once (the oldest first, as `dlq.list` returns them). */
const LIST_LIMIT = 500;

/**
 * A line saying what was done (replayed, purged), with optional links.
 * @param {HTMLElement} section
 * @param {...(string | Node)} parts
 */
function notify(section, ...parts) {
  const line = /** @type {HTMLElement} */ (section.querySelector("[data-role=notice]"));
  line.replaceChildren(...parts);
  line.hidden = parts.length === 0;
}

/**
 * Replay one dead letter; says where the task went.
 * @param {Api} api
 * @param {HTMLElement} section
 * @param {number} id
 * @returns {Promise<boolean>}  Whether it was replayed.
 */
async function replay(api, section, id) {
  try {
    const { replayed } = await api.call("dlq.replay", { id });
    showError(section, null);
    notify(section, `Dead letter ${id} replayed: queued again as task `, taskLink(String(replayed[0])), ".");
    return true;
  } catch (error) {
    showError(section, error);
    return false;
  }
}

export class DlqView {
  #latest = new Latest();
  #count = 0;

  /** @param {Api} api */
  constructor(api) {
    this.api = api;
    this.section = byId("view-dlq", HTMLElement);
    this.tbody = byId("dlq-rows", HTMLTableSectionElement);
    this.purgeDialog = byId("purge-dialog", HTMLDialogElement);
    byId("dlq-refresh", HTMLButtonElement).addEventListener("click", () => this.refresh());
    byId("dlq-purge", HTMLButtonElement).addEventListener("click", () => this.#confirmPurge());
    this.purgeDialog.addEventListener("close", () => {
      if (this.purgeDialog.returnValue === "purge") this.#purge();
    });
  }

  show() {
    this.#latest.forget();
    notify(this.section);
    return this.refresh();
  }

  async refresh() {
    try {
      const { dead_letters: letters } = await this.api.call("dlq.list", { limit: LIST_LIMIT });
      showError(this.section, null);
      this.#count = letters.length;
      this.#latest.render(letters, () =>
        fillTable(this.tbody, letters.map((/** @type {any} */ d) => this.#row(d)), "No dead letter."));
    } catch (error) {
      showError(this.section, error);
    }
  }

  /** @param {any} letter */
  #row(letter) {
    const replayButton = letter.kind === "task"
      ? el("button", { type: "button", onclick: () => this.#replay(letter.id) }, "Replay")
      : null;
    return el("tr", { "data-letter-id": letter.id },
      el("td", { className: "num" }, el("a", { href: `#/dlq/${letter.id}` }, String(letter.id))),
      el("td", null, dateTime(letter.created_at)),
      el("td", null, letter.kind),
      el("td", { className: "type" }, show(letter.type)),
      el("td", { className: "error-text" }, letter.reason),
      el("td", { className: "actions" }, el("a", { href: `#/dlq/${letter.id}` }, "Show"), " ", replayButton));
  }

  /** @param {number} id */
  async #replay(id) {
    if (await replay(this.api, this.section, id)) this.refresh();
  }

  #confirmPurge() {
    const text = /** @type {HTMLElement} */ (this.purgeDialog.querySelector("[data-role=text]"));
    const listed = this.#count === 1 ? "The dead letter listed here" : `All ${this.#count} dead letters listed here`;
    text.textContent = `${listed} (and any that arrived since) are deleted; ` +
      "dead tasks can no longer be replayed. This cannot be undone.";
    this.purgeDialog.returnValue = "";
    this.purgeDialog.showModal();
  }

  async #purge() {
    try {
      const { purged } = await this.api.call("dlq.purge", { yes: true });
      showError(this.section, null);
      notify(this.section, `Purged ${purged} dead letter${purged === 1 ? "" : "s"}.`);
      this.refresh();
    } catch (error) {
      showError(this.section, error);
    }
  }
}

export class LetterView {
  /** @type {number | null} */
  #id = null;

  /** @param {Api} api */
  constructor(api) {
    this.api = api;
    this.section = byId("view-letter", HTMLElement);
    this.title = byId("letter-title", HTMLElement);
    this.facts = byId("letter-facts", HTMLElement);
    this.attempts = byId("letter-attempts", HTMLTableSectionElement);
    this.body = byId("letter-body", HTMLElement);
    this.replayButton = byId("letter-replay", HTMLButtonElement);
    this.replayButton.addEventListener("click", async () => {
      if (this.#id !== null && await replay(this.api, this.section, this.#id)) this.replayButton.disabled = true;
    });
  }

  /** @param {string | null} param */
  async show(param) {
    this.#id = Number(param);
    this.title.textContent = `Dead letter ${show(param)}`;
    notify(this.section);
    for (const part of [this.facts, this.attempts, this.body]) part.replaceChildren();
    this.replayButton.hidden = true;
    try {
      const { dead_letter: letter } = await this.api.call("dlq.show", { id: this.#id });
      showError(this.section, null);
      this.#render(letter);
    } catch (error) {
      showError(this.section, error);
    }
  }

  /** @param {any} letter */
  #render(letter) {
    const detail = letter.detail ?? {};
    const spec = parseBody(letter.body);
    this.facts.replaceChildren(definitionList([
      ["reason", letter.reason],
      ["kind", letter.kind],
      ["when", dateTime(letter.created_at)],
      ["type", spec?.type],
      ["task", detail.task_id ? taskLink(String(detail.task_id)) : null],
      ["last error", detail.error],
    ]));
    fillAttempts(this.attempts, detail.attempts);
    this.body.textContent = spec === null ? letter.body : json(spec, 2);
    this.replayButton.hidden = letter.kind !== "task";
    this.replayButton.disabled = false;
  }
}

/**
 * The body of a dead letter as JSON when it is (a task's spec), else null.
 * @param {string} body
 */
function parseBody(body) {
  try {
    return JSON.parse(body);
  } catch {
    return null;
  }
}
