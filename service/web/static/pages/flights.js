// Flights: the frames grouped into flights (GET /v1/flights), newest first: each one's time
// span, frames and how many are on the ground, the ground covered and counts per label, with
// a link to its own page. Also the formats the flight page shares.

import { json } from "../api.js";
import { colour, errorBox, h } from "../dom.js";

// The flight page's path: the id as one segment, its slashes and spaces encoded.
export function flightPath(id) {
  return `/flights/${encodeURIComponent(id)}`;
}

// Ground covered: square metres when small, hectares from one.
export function area(m2) {
  if (m2 == null) return "–";
  if (m2 < 10000) return `${Math.round(m2).toLocaleString()} m²`;
  return `${(m2 / 10000).toFixed(m2 < 100000 ? 2 : 1)} ha`;
}

// Capture times are the camera's local clock, without a zone: shown as written.
export function span(flight) {
  const at = (text) => (text ? text.replace("T", " ") : "–");
  if (!flight.started) return "no capture time";
  return flight.ended && flight.ended !== flight.started ? `${at(flight.started)} – ${at(flight.ended)}` : at(flight.started);
}

// A swatch's colour is set from script: the page's CSP refuses inline style attributes.
export function swatch(label) {
  const mark = h("i", { class: "swatch" });
  mark.style.backgroundColor = colour(label);
  return mark;
}

export function counts(byLabel) {
  const entries = Object.entries(byLabel || {}).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  if (!entries.length) return h("span", { class: "muted" }, "none");
  return h("span", { class: "legend label-counts" }, entries.map(([label, n]) =>
    h("span", { dataset: { label, count: n } }, swatch(label), ` ${n} ${label}`)));
}

function row(flight) {
  return h("tr", { dataset: { flight: flight.id } },
    h("td", {}, h("a", { href: flightPath(flight.id) }, flight.id), flight.explicit ? null : h("span", { class: "tag", title: "grouped by capture time" }, "auto")),
    h("td", {}, span(flight)),
    h("td", { class: "num" }, `${flight.located} / ${flight.frames}`),
    h("td", { class: "num" }, area(flight.area_m2)),
    h("td", { class: "counts" }, counts(flight.counts)));
}

export async function render(root) {
  document.title = "Flights · aip";
  root.replaceChildren(h("h1", {}, "Flights"), h("p", { class: "muted" }, "Loading…"));
  let flights;
  try {
    flights = (await json("/v1/flights")).flights;
  } catch (error) {
    root.replaceChildren(h("h1", {}, "Flights"), errorBox(error));
    return;
  }
  if (!flights.length) {
    root.replaceChildren(h("h1", {}, "Flights"), h("p", { class: "muted", id: "flights-empty" },
      "No flights yet: frames with a capture time, or submitted with a flight, are grouped here."));
    return;
  }
  const heads = [["Flight"], ["Time span"], ["On the ground / frames", "num"], ["Ground covered", "num"], ["Detections"]];
  root.replaceChildren(h("h1", {}, "Flights"),
    h("table", {}, h("thead", {}, h("tr", {}, heads.map(([t, c]) => h("th", { class: c }, t)))), h("tbody", { id: "flights" }, flights.map(row))));
}
