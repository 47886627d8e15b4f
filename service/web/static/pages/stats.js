// Stats: jobs per day by status (stacked bars), detections per label and mean stage timings
// (horizontal bars), drawn as SVG from /v1/stats.

import { json } from "../api.js";
import { colour, errorBox, h, ms, s } from "../dom.js";

const STATUSES = ["succeeded", "failed", "cancelled", "running", "queued"];

function perDay(byStatus) {
  const days = [...new Set(Object.values(byStatus).flatMap((st) => st.per_day.map((d) => d.day)))].sort();
  const totals = days.map((day) => STATUSES.reduce((sum, status) =>
    sum + (byStatus[status].per_day.find((d) => d.day === day)?.jobs || 0), 0));
  const max = Math.max(1, ...totals);
  const width = Math.max(640, days.length * 36 + 60);
  const height = 220;
  const svg = s("svg", { class: "chart", id: "chart-days", viewBox: `0 0 ${width} ${height}`, role: "img" });
  days.forEach((day, i) => {
    let y = height - 30;
    for (const status of STATUSES) {
      const n = byStatus[status].per_day.find((d) => d.day === day)?.jobs || 0;
      if (!n) continue;
      const bar = ((height - 60) * n) / max;
      y -= bar;
      svg.append(s("rect", { x: 50 + i * 36, y, width: 28, height: bar, class: `bar status-fill-${status}` },
        s("title", {}, `${day} ${status}: ${n}`)));
    }
    svg.append(s("text", { x: 64 + i * 36, y: height - 12, "text-anchor": "middle", class: "axis" }, day.slice(5)));
  });
  svg.append(s("text", { x: 4, y: 24, class: "axis" }, String(max)), s("text", { x: 4, y: height - 30, class: "axis" }, "0"));
  const legend = h("p", { class: "legend" }, STATUSES.map((st) => h("span", { class: `key status-${st}` }, st)));
  return h("div", {}, svg, legend);
}

function hbars(id, entries, format, paint) {
  const max = Math.max(1, ...entries.map(([, v]) => v));
  const row = 26;
  const svg = s("svg", { class: "chart", id, viewBox: `0 0 480 ${Math.max(1, entries.length) * row + 8}`, role: "img" });
  entries.forEach(([name, value], i) => {
    svg.append(
      s("text", { x: 0, y: i * row + 18, class: "axis" }, name),
      s("rect", { x: 140, y: i * row + 4, width: Math.max(1, (280 * value) / max), height: row - 8, fill: paint(name), class: "bar" },
        s("title", {}, `${name}: ${format(value)}`)),
      s("text", { x: 146 + (280 * value) / max, y: i * row + 18, class: "axis" }, format(value)));
  });
  return svg;
}

export async function render(root) {
  root.replaceChildren(h("h1", {}, "Stats"), h("p", { class: "muted" }, "Loading…"));
  try {
    const all = await json("/v1/stats");
    const byStatus = Object.fromEntries(await Promise.all(STATUSES.map(async (status) =>
      [status, all.by_status[status] ? await json(`/v1/stats?status=${status}`) : { per_day: [] }])));
    const labels = Object.entries(all.detections_per_label).map(([k, v]) => [k, v.detections]).sort((a, b) => b[1] - a[1]);
    const timings = Object.entries(all.mean_timings_ms).filter(([k]) => k !== "total");
    root.replaceChildren(
      h("h1", {}, "Stats"),
      h("p", {}, `${all.jobs} jobs: `, Object.entries(all.by_status).map(([k, v]) => `${k} ${v}`).join(" · ")),
      h("section", {}, h("h2", {}, "Jobs per day by status"), perDay(byStatus)),
      h("section", {}, h("h2", {}, "Detections per label"), labels.length ? hbars("chart-labels", labels, String, colour) : h("p", { class: "muted" }, "None yet.")),
      h("section", {}, h("h2", {}, "Mean stage timings"), timings.length ? hbars("chart-timings", timings, ms, () => "var(--accent)") : h("p", { class: "muted" }, "None yet.")));
  } catch (error) {
    root.replaceChildren(h("h1", {}, "Stats"), errorBox(error));
  }
}
