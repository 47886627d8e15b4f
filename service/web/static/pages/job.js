// Job: the image with its numbered boxes and masks drawn as SVG over it, toggled per label;
// the reasoning (a sentence citing [n] highlights detection n on hover), the structured
// answer, prompt and queries, a per-stage timing bar, attempts, EXIF, follow-ups, downloads.
// Live: the job's events redraw it, and the reasoning streams in while it runs.

import { blobUrl, download, json, live, post } from "../api.js";
import { badge, colour, errorBox, h, ms, s, when } from "../dom.js";

const STAGES = ["queue_wait", "decode", "plan", "detect", "reason", "redact", "persist"];
const CITE = /\[(\d+(?:\s*[-,–]\s*\d+)*)\]|#\s?(\d+)\b|\bdetections?\s+(\d+)/gi;

function maskImage(mask, colourText) {
  const [height, width] = mask.size;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(width, height);
  ctx.fillStyle = colourText;
  ctx.fillRect(0, 0, 1, 1);
  const [r, g, b] = ctx.getImageData(0, 0, 1, 1).data;
  let position = 0;
  let on = false;
  for (const run of mask.counts) {
    if (on) {
      for (let i = position; i < position + run; i += 1) {
        pixels.data.set([r, g, b, 110], i * 4);
      }
    }
    position += run;
    on = !on;
  }
  ctx.putImageData(pixels, 0, 0);
  return canvas.toDataURL();
}

function overlay(job) {
  const { width, height } = job.input;
  const detections = job.result ? job.result.detections : [];
  const stroke = Math.max(2, Math.round(Math.max(width, height) / 300));
  const svg = s("svg", { class: "boxes", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
  for (const d of detections) {
    const [x1, y1, x2, y2] = d.box;
    const c = colour(d.label);
    const group = s("g", { class: "detection", "data-number": d.number, "data-label": d.label });
    if (d.mask) {
      group.append(s("image", { href: maskImage(d.mask, c), x: 0, y: 0, width, height,
        preserveAspectRatio: "none", class: "mask" }));
    }
    group.append(
      s("rect", { x: x1, y: y1, width: Math.max(1, x2 - x1), height: Math.max(1, y2 - y1),
        stroke: c, "stroke-width": stroke, fill: "none" }),
      s("text", { x: x1 + stroke, y: y1 + stroke * 8, fill: c, "font-size": stroke * 8 }, String(d.number)),
      s("title", {}, `${d.number}: ${d.label}`));
    svg.append(group);
  }
  return svg;
}

function numbersIn(text) {
  const out = new Set();
  for (const m of text.matchAll(CITE)) {
    if (m[1]) {
      for (const part of m[1].split(",")) {
        const [a, b] = part.split(/[-–]/).map((x) => parseInt(x, 10));
        for (let n = a; n <= (b || a) && n - a < 100; n += 1) out.add(n);
      }
    } else out.add(parseInt(m[2] || m[3], 10));
  }
  return out;
}

function highlight(figure, numbers) {
  for (const g of figure.querySelectorAll("g.detection")) {
    g.classList.toggle("cited", numbers.has(Number(g.dataset.number)));
  }
  figure.classList.toggle("citing", numbers.size > 0);
}

function reasoning(text, figure) {
  const sentences = text.match(/[^.!?\n]+[.!?]*\s*|\n/g) || [];
  return h("div", { class: "reasoning", id: "reasoning" }, sentences.map((sentence) => {
    const numbers = numbersIn(sentence);
    if (!numbers.size) return sentence;
    return h("span", {
      class: "cites", dataset: { cites: [...numbers].join(",") },
      onmouseenter: () => highlight(figure, numbers),
      onmouseleave: () => highlight(figure, new Set()),
    }, sentence);
  }));
}

function toggles(job, figure) {
  const counts = {};
  for (const d of job.result ? job.result.detections : []) counts[d.label] = (counts[d.label] || 0) + 1;
  return h("div", { class: "toggles", id: "labels" }, Object.entries(counts).map(([label, count]) => {
    const box = h("input", { type: "checkbox", checked: true, "data-label": label });
    box.addEventListener("change", () => {
      for (const g of figure.querySelectorAll("g.detection")) {
        if (g.dataset.label === label) g.classList.toggle("hidden", !box.checked);
      }
    });
    const swatch = h("i", { class: "swatch" });
    swatch.style.backgroundColor = colour(label);
    return h("label", { class: "toggle" }, box, swatch, ` ${label} (${count})`);
  }));
}

function timingBar(timings) {
  const stages = STAGES.filter((k) => timings[k] > 0);
  const total = stages.reduce((sum, k) => sum + timings[k], 0) || 1;
  const bar = h("div", { class: "stagebar", id: "stagebar" });
  for (const stage of stages) {
    const part = h("span", { class: `stage stage-${stage}`, title: `${stage}: ${ms(timings[stage])}` }, stage);
    part.style.width = `${(100 * timings[stage]) / total}%`;
    bar.append(part);
  }
  return h("div", {}, bar, h("p", { class: "muted" },
    stages.map((k) => `${k} ${ms(timings[k])}`).join(" · "), timings.total ? ` · total ${ms(timings.total)}` : ""));
}

function queries(job) {
  const planned = new Set((job.result && job.result.planned_queries) || []);
  const list = job.params.queries.length ? job.params.queries : [...planned];
  return h("ul", { class: "queries", id: "queries" }, list.map((q) =>
    h("li", {}, q, planned.has(q) || job.params.plan ? h("span", { class: "tag" }, "proposed") : "")));
}

function attempts(job) {
  const rows = (job.attempt_history || []).map((a) => h("tr", {},
    h("td", {}, a.attempt), h("td", {}, a.outcome), h("td", {}, a.worker), h("td", {}, when(a.started_at)),
    h("td", {}, when(a.finished_at)), h("td", {}, a.error ? `${a.error.code}: ${a.error.message}` : "")));
  return h("table", { class: "attempts" }, h("thead", {}, h("tr", {}, ["#", "Outcome", "Worker",
    "Started", "Finished", "Error"].map((t) => h("th", {}, t)))), h("tbody", {}, rows));
}

function webhooks(job) {
  const rows = job.webhooks.map((w) => h("tr", {},
    h("td", {}, w.url), h("td", {}, w.status), h("td", {}, w.attempts),
    h("td", {}, w.last_status ?? ""), h("td", {}, w.last_error || ""),
    h("td", {}, when(w.delivered_at || w.next_attempt_at))));
  return h("table", { class: "webhooks" }, h("thead", {}, h("tr", {}, ["URL", "Status", "Attempts",
    "Last HTTP status", "Last error", "Delivered / next try"].map((t) => h("th", {}, t)))), h("tbody", {}, rows));
}

function exif(job) {
  const data = job.input.exif || {};
  const gps = data.gps;
  const lines = [h("dt", {}, "Size"), h("dd", {}, `${job.input.width} × ${job.input.height} ${job.input.format}`)];
  if (job.input.captured_at) lines.push(h("dt", {}, "Captured"), h("dd", {}, job.input.captured_at));
  lines.push(h("dt", {}, "Location"), h("dd", { id: "location" }, gps && gps.latitude != null
    ? `${gps.latitude.toFixed(6)}, ${gps.longitude.toFixed(6)}${gps.altitude != null ? ` · ${gps.altitude} m` : ""}`
    : "no position in the image"));
  for (const [key, value] of Object.entries(data)) {
    if (key !== "gps") lines.push(h("dt", {}, key), h("dd", {}, typeof value === "object" ? JSON.stringify(value) : String(value)));
  }
  return h("dl", { class: "exif" }, lines);
}

function followups(job, reload) {
  const question = h("input", { type: "text", name: "question", placeholder: "Ask about this image…", required: true });
  const note = h("p", { class: "muted" });
  const form = h("form", { class: "ask", id: "ask" }, question, h("button", { type: "submit" }, "Ask"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    note.textContent = "asking…";
    try {
      await post(`/v1/jobs/${job.id}/ask?wait=60`, { question: question.value });
      question.value = "";
      note.textContent = "";
      reload();
    } catch (error) {
      note.textContent = error.message;
    }
  });
  const asked = (job.followups || []).map((f) => h("div", { class: "followup" },
    h("p", {}, h("b", {}, `Q${f.n}. `), f.question),
    h("p", {}, f.answer != null ? f.answer : f.error ? f.error.message : badge(f.status))));
  return h("div", {}, asked, job.status === "succeeded" ? form : h("p", { class: "muted" }, "Questions can be asked once the job has succeeded."), note);
}

function downloads(job) {
  const link = (text, path, name) => h("button", { type: "button", onclick: () => download(path, name) }, text);
  return h("div", { class: "toolbar", id: "downloads" },
    redacting(job)
      ? (shown(job) ? link("Redacted image", `/v1/jobs/${job.id}/image`, `job-${job.id}-redacted-${job.input.name}`) : "")
      : link("Original", `/v1/jobs/${job.id}/image`, job.input.name),
    job.result ? link("Annotated", `/v1/jobs/${job.id}/annotated`, `job-${job.id}-annotated.jpg`) : "",
    link("JSON", `/v1/jobs/${job.id}`, `job-${job.id}.json`));
}

// A redacting job hands out only its redacted copy, which exists once the job has succeeded.
function redacting(job) {
  return Boolean(job.params.redact && job.params.redact.length);
}

export function shown(job) {
  return redacting(job) ? job.status === "succeeded" : job.input.stored;
}

function section(title, ...children) {
  return h("section", {}, h("h2", {}, title), ...children);
}

// What the API takes as a job id: a whole number from 1 to 2^63 - 1.
function isJobId(text) {
  return /^[1-9]\d{0,18}$/.test(text) && BigInt(text) <= 2n ** 63n - 1n;
}

function missing(title, ...text) {
  return h("div", { class: "missing", id: "missing" }, h("h1", {}, title), h("p", {}, ...text),
    h("p", {}, h("a", { href: "/" }, "All jobs")));
}

export async function render(root, id) {
  if (!isJobId(id)) {
    root.replaceChildren(missing("Not a job id", h("code", {}, id), " is not a job id: job ids are whole numbers from 1."));
    return;
  }
  let streamed = "";
  let view = null;
  let latest = 0;
  let gone = false; // no such job: nothing more is asked about it
  let stop = null;
  async function draw() {
    if (gone) return;
    const mine = ++latest;
    let job;
    try {
      job = await json(`/v1/jobs/${id}`);
    } catch (error) {
      if (error.status === 404) {
        gone = true;
        if (stop) stop();
        root.replaceChildren(missing("No such job", `There is no job #${id}: it was never made, or it has been deleted.`));
      } else root.replaceChildren(errorBox(error));
      return;
    }
    if (mine !== latest) return; // a newer read is on its way: answers can cross
    const image = h("img", { alt: job.input.name, id: "frame" });
    const figure = h("figure", { class: "frame", id: "figure" }, image, overlay(job));
    if (shown(job)) blobUrl(`/v1/jobs/${job.id}/image`).then((url) => { image.src = url; }, () => {});
    const result = job.result;
    const text = result ? result.reasoning : streamed;
    const actions = [];
    if (["queued", "running"].includes(job.status)) actions.push(h("button", { type: "button", onclick: () => post(`/v1/jobs/${id}/cancel`).then(draw) }, "Cancel"));
    if (["failed", "cancelled"].includes(job.status)) actions.push(h("button", { type: "button", onclick: () => post(`/v1/jobs/${id}/retry`).then(draw) }, "Retry"));
    view = h("div", { class: "job", dataset: { status: job.status } },
      h("h1", {}, `Job #${job.id} `, badge(job.status), job.stage ? h("span", { class: "muted", id: "stage" }, ` ${job.stage}`) : "",
        job.queue_position ? h("span", { class: "muted" }, ` · position ${job.queue_position} in the queue`) : ""),
      h("div", { class: "toolbar" }, actions, downloads(job)),
      job.error ? h("p", { class: "error" }, `${job.error.code}: ${job.error.message}`) : "",
      h("div", { class: "columns" },
        h("div", {}, figure, toggles(job, figure)),
        h("div", {},
          section("Prompt", h("p", { id: "prompt" }, job.params.prompt || h("span", { class: "muted" }, "(none)"))),
          section("Queries", queries(job)),
          section("Reasoning", text ? reasoning(text, figure) : h("p", { class: "muted", id: "reasoning" }, "—")),
          result && result.answer != null ? section("Answer", h("pre", { id: "answer" }, JSON.stringify(result.answer, null, 2))) : "",
          section("Detections", h("ol", { id: "detections" }, (result ? result.detections : []).map((d) =>
            h("li", { value: d.number }, `${d.label} `, h("span", { class: "muted" }, d.box.map((v) => Math.round(v)).join(", "))))),
          ),
        )),
      section("Timings", timingBar(job.timings_ms || {})),
      section("Attempts", attempts(job)),
      job.webhooks && job.webhooks.length ? section("Webhooks", webhooks(job)) : "",
      section("Image", exif(job)),
      section("Follow-up questions", followups(job, draw)));
    root.replaceChildren(view);
  }
  await draw();
  if (gone) return;
  let pending = null;
  stop = live({
    jobId: Number(id),
    onEvent: (event) => {
      if (event.job_id != null && String(event.job_id) !== String(id)) return;
      if (event.type === "job.text") {
        streamed += event.data.delta || "";
        const box = root.querySelector("#reasoning");
        if (box && view && view.dataset.status === "running") box.textContent = streamed;
        return;
      }
      if (!pending) pending = setTimeout(() => { pending = null; draw(); }, 200);
    },
    poll: () => { if (!view || ["queued", "running"].includes(view.dataset.status)) draw(); },
  });
}
