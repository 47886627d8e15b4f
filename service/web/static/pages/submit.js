// Submit: images dropped (files, or folders where the browser lets a page walk them) or
// chosen, with queries, prompt and profile; one job each, a progress bar per file while it
// uploads, then the job's status, live.

import { json, live, upload } from "../api.js";
import { badge, h } from "../dom.js";

const FINISHED = ["succeeded", "failed", "cancelled"];
const IMAGE = /\.(jpe?g|png|webp|tiff?|bmp|gif|mpo)$/i;

// Files under a dropped folder (webkitGetAsEntry: Chromium, Firefox, Safari).
async function walk(entry, out) {
  if (entry.isFile) {
    out.push(await new Promise((resolve, reject) => entry.file(resolve, reject)));
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      for (const child of batch) await walk(child, out);
    }
  }
}

async function dropped(transfer) {
  const entries = [...(transfer.items || [])]
    .map((item) => (item.kind === "file" && item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
  if (entries.length && entries.every(Boolean)) {
    const files = [];
    for (const entry of entries) await walk(entry, files);
    return files;
  }
  return [...transfer.files];
}

export async function render(root) {
  const queries = h("input", { name: "queries", placeholder: "car, person (empty: the service's default)" });
  const prompt = h("textarea", { name: "prompt", rows: 3, placeholder: "What should the reasoner answer?" });
  const profile = h("select", { name: "profile" }, h("option", { value: "" }, "(default)"));
  json("/v1/profiles").then((body) => {
    for (const p of body.profiles || []) profile.append(h("option", { value: p.name }, p.name));
  }, () => {});
  const list = h("tbody", { id: "uploads" });
  const rows = new Map();
  const picker = h("input", { type: "file", multiple: true, accept: "image/*", id: "files" });
  const folder = h("input", { type: "file", webkitdirectory: true, id: "folder" });
  const zone = h("div", { class: "dropzone", id: "dropzone", tabindex: 0 },
    h("p", {}, "Drop images or folders here"), h("p", { class: "muted" }, "or choose "), picker,
    h("p", { class: "muted" }, "a folder "), folder);

  function submit(files) {
    for (const file of files) {
      if (!IMAGE.test(file.name) && !file.type.startsWith("image/")) continue;
      const bar = h("progress", { max: 1, value: 0 });
      const state = h("td", { class: "state" }, "uploading");
      const tr = h("tr", { dataset: { file: file.name } }, h("td", {}, file.webkitRelativePath || file.name), h("td", {}, bar), state);
      list.append(tr);
      const form = new FormData();
      form.append("image", file, file.name);
      if (queries.value.trim()) form.append("queries", queries.value.trim());
      if (prompt.value.trim()) form.append("prompt", prompt.value.trim());
      if (profile.value) form.append("profile", profile.value);
      upload("/v1/jobs", form, (fraction) => { bar.value = fraction; }).then((job) => {
        bar.value = 1;
        rows.set(String(job.id), tr);
        tr.dataset.job = job.id;
        show(tr, job);
        // Its events may have come before this answer: read it once now it is watched.
        refresh(job.id);
      }, (error) => {
        state.replaceChildren(h("span", { class: "error" }, error.message));
      });
    }
  }

  function show(tr, job) {
    // Reads can cross: a finished job never shows as waiting again (this page cannot retry).
    if (FINISHED.includes(tr.dataset.status) && !FINISHED.includes(job.status)) return;
    tr.dataset.status = job.status;
    tr.lastChild.replaceChildren(h("a", { href: `/jobs/${job.id}` }, `#${job.id}`), " ", badge(job.status));
  }

  async function refresh(id) {
    const tr = rows.get(String(id));
    if (tr) show(tr, await json(`/v1/jobs/${id}`));
  }

  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    submit(await dropped(e.dataTransfer));
  });
  picker.addEventListener("change", () => { submit([...picker.files]); picker.value = ""; });
  folder.addEventListener("change", () => { submit([...folder.files]); folder.value = ""; });

  root.replaceChildren(
    h("h1", {}, "Submit"),
    h("div", { class: "form" },
      h("label", {}, "Queries", queries), h("label", {}, "Prompt", prompt), h("label", {}, "Profile", profile)),
    zone,
    h("table", { class: "uploads" }, h("thead", {}, h("tr", {}, h("th", {}, "File"), h("th", {}, "Upload"), h("th", {}, "Job"))), list));
  live({
    onEvent: (event) => { if (event.type.startsWith("job.") && rows.has(String(event.job_id))) refresh(event.job_id); },
    poll: () => {
      for (const [id, tr] of rows) if (["queued", "running"].includes(tr.dataset.status)) refresh(id);
    },
  });
}
