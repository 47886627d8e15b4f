// Jobs: the filtered history, newest first, a page at a time; live through /v1/events (a
// change reloads the page shown); thumbnails; bulk cancel and retry of the selected jobs.

import { blobUrl, json, live, post } from "../api.js";
import { shown } from "./job.js";
import { badge, errorBox, h, when } from "../dom.js";

const FILTERS = [
  ["status", "Status", ["", "queued", "running", "succeeded", "failed", "cancelled"]],
  ["source", "Source", ["", "api", "path", "inbox"]],
  ["folder", "Folder"],
  ["label", "Label"],
  ["min_count", "Min count", "number"],
  ["created_after", "Created after", "date"],
  ["created_before", "Created before", "date"],
  ["q", "Text"],
];

function filterForm(values, onApply) {
  const fields = FILTERS.map(([name, text, kind]) => {
    let input;
    if (Array.isArray(kind)) {
      input = h("select", { name }, kind.map((v) => h("option", { value: v }, v || "any")));
    } else {
      input = h("input", { name, type: kind || "search", min: kind === "number" ? 1 : null });
    }
    input.value = values.get(name) || "";
    return h("label", {}, text, input);
  });
  const form = h("form", { class: "filters", id: "filters" }, fields,
    h("button", { type: "submit" }, "Filter"),
    h("button", { type: "reset" }, "Clear"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    onApply(new FormData(form));
  });
  form.addEventListener("reset", () => setTimeout(() => onApply(new FormData(form))));
  return form;
}

function query(values, cursor) {
  const out = new URLSearchParams();
  for (const [name, value] of values) if (value) out.set(name, value);
  // A day picked as "created before" includes that day (the service reads dates as UTC).
  const before = out.get("created_before");
  if (before && /^\d{4}-\d\d-\d\d$/.test(before)) out.set("created_before", `${before}T23:59:59.999`);
  if (cursor) out.set("cursor", cursor);
  out.set("limit", "25");
  return out;
}

function thumbnail(job) {
  const img = h("img", { class: "thumb", alt: "", loading: "lazy" });
  if (shown(job)) blobUrl(`/v1/jobs/${job.id}/image`).then((url) => { img.src = url; }, () => {});
  return img;
}

function row(job, selected) {
  const detections = job.result ? job.result.detections.length : "";
  const box = h("input", { type: "checkbox", "aria-label": `select job ${job.id}` });
  box.checked = selected.has(job.id);
  box.addEventListener("change", () => (box.checked ? selected.add(job.id) : selected.delete(job.id)));
  return h("tr", { dataset: { job: job.id, status: job.status } },
    h("td", {}, box),
    h("td", {}, thumbnail(job)),
    h("td", {}, h("a", { href: `/jobs/${job.id}` }, `#${job.id}`)),
    h("td", {}, badge(job.status), job.stage ? ` ${job.stage}` : ""),
    h("td", {}, job.input.name),
    h("td", { class: "num" }, detections),
    h("td", {}, job.source),
    h("td", {}, when(job.created_at)));
}

export async function render(root) {
  const values = new URLSearchParams(location.search);
  const cursors = [null]; // the cursor of each page shown so far: back is the one before
  const selected = new Set();
  const body = h("tbody");
  const message = h("div", { class: "message" });
  const older = h("button", { type: "button", id: "older" }, "Older →");
  const newer = h("button", { type: "button", id: "newer" }, "← Newer");
  let next = null;

  let latest = 0;
  async function load() {
    const mine = ++latest;
    try {
      const page = await json(`/v1/jobs?${query(values, cursors.at(-1))}`);
      if (mine !== latest) return; // a newer read is on its way: answers can cross
      next = page.next_cursor;
      body.replaceChildren(...page.jobs.map((job) => row(job, selected)));
      if (!page.jobs.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No jobs match.")));
      older.disabled = !next;
      newer.disabled = cursors.length === 1;
      message.replaceChildren();
    } catch (error) {
      message.replaceChildren(errorBox(error));
    }
  }

  let pending = null;
  const soon = () => {
    // Many events in a burst: one reload.
    if (!pending) pending = setTimeout(() => { pending = null; load(); }, 250);
  };

  async function bulk(action) {
    const ids = [...selected];
    const results = await Promise.allSettled(ids.map((id) => post(`/v1/jobs/${id}/${action}`)));
    const refused = results.filter((r) => r.status === "rejected");
    selected.clear();
    message.replaceChildren(
      h("p", { class: refused.length ? "error" : "note" },
        `${action}: ${ids.length - refused.length} of ${ids.length} done`,
        refused.length ? ` (${refused[0].reason.message})` : ""));
    await load();
  }

  const form = filterForm(values, (data) => {
    for (const [name] of FILTERS) values.delete(name);
    for (const [name, value] of data) if (value) values.set(name, value);
    history.replaceState(null, "", values.toString() ? `/?${values}` : "/");
    cursors.length = 1;
    load();
  });
  older.addEventListener("click", () => { if (next) { cursors.push(next); load(); } });
  newer.addEventListener("click", () => { if (cursors.length > 1) { cursors.pop(); load(); } });
  const all = h("input", { type: "checkbox", "aria-label": "select all" });
  all.addEventListener("change", () => {
    for (const box of body.querySelectorAll("input[type=checkbox]")) {
      box.checked = all.checked;
      box.dispatchEvent(new Event("change"));
    }
  });

  root.replaceChildren(
    h("h1", {}, "Jobs"),
    form,
    h("div", { class: "toolbar" },
      h("button", { type: "button", id: "bulk-cancel", onclick: () => bulk("cancel") }, "Cancel selected"),
      h("button", { type: "button", id: "bulk-retry", onclick: () => bulk("retry") }, "Retry selected"),
      h("span", { class: "spacer" }), newer, older),
    message,
    h("table", { class: "jobs", id: "jobs" },
      h("thead", {}, h("tr", {}, h("th", {}, all), h("th"), h("th", {}, "Job"), h("th", {}, "Status"),
        h("th", {}, "Input"), h("th", {}, "Detections"), h("th", {}, "Source"), h("th", {}, "Created"))),
      body));
  await load();
  live({
    onEvent: (event) => { if (event.type.startsWith("job.") && event.type !== "job.text") soon(); },
    poll: load,
  });
}
