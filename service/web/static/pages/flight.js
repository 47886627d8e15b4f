// One flight (GET /v1/flights/{id}): its summary, counts and real sizes per label, its jobs,
// its report (HTML, or PDF where the service can print one), and what changed since another
// flight (GET /v1/changes) with the report of this flight since that one.

import { download, json } from "../api.js";
import { errorBox, h } from "../dom.js";
import { area, counts, flightPath, span, swatch } from "./flights.js";

const CHANGE_KINDS = [
  ["new", "new"], ["gone", "gone"], ["moved", "moved"], ["same", "unchanged"],
  ["unseen", "not seen again"], ["unseen_before", "outside the earlier ground"],
];

function missing(name) {
  document.title = "No such flight · aip";
  return h("div", { class: "missing", id: "missing" }, h("h1", {}, "No such flight"),
    h("p", {}, "There is no flight ", h("code", {}, name), ": its frames may have been deleted."),
    h("p", {}, h("a", { href: "/flights" }, "All flights")));
}

// The report's file name, as the service names its download.
function fileName(name, ext) {
  const kept = [...name].map((c) => (/^[A-Za-z0-9._-]$/.test(c) ? c : "-")).join("").replace(/^[-.]+|[-.]+$/g, "");
  return `flight-${kept.slice(0, 80) || "report"}.${ext}`;
}

// A link that opens the report in a new tab, on the dashboard's report page: a link straight
// to /v1/reports cannot carry the token, that page reads it with the token. Opened by script
// so the new tab starts with this tab's session (its token) rather than asking again.
function reportLink(path, text, id) {
  return h("a", {
    href: path, target: "_blank", id,
    onclick: (event) => {
      if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey) return;
      event.preventDefault();
      window.open(path, "_blank");
    },
  }, text);
}

function summary(flight) {
  const bbox = flight.bbox ? flight.bbox.map((v) => v.toFixed(5)).join(", ") : "–";
  const item = (term, value, key) => [h("dt", {}, term), h("dd", { dataset: { key } }, value)];
  return h("dl", { id: "flight-summary" },
    item("Grouped", flight.explicit ? "named on submission or by its inbox folder" : "by capture time and take-off place", "explicit"),
    item("Time span", span(flight), "span"),
    item("Frames", String(flight.frames), "frames"),
    item("On the ground", `${flight.located} of ${flight.frames}`, "located"),
    item("Ground covered", area(flight.area_m2), "area"),
    item("Bounds (W, S, E, N)", bbox, "bbox"));
}

function labels(flight) {
  const names = Object.keys(flight.counts || {}).sort((a, b) => flight.counts[b] - flight.counts[a] || a.localeCompare(b));
  if (!names.length) return h("p", { class: "muted", id: "flight-labels" }, "No detections in this flight.");
  const metres = (v) => (v == null ? "–" : `${v.toFixed(1)} m`);
  const heads = ["Label", "Count", "Smallest", "Median", "Largest"];
  return h("table", { id: "flight-labels" },
    h("thead", {}, h("tr", {}, heads.map((t, i) => h("th", { class: i ? "num" : null }, t)))),
    h("tbody", {}, names.map((label) => {
      const size = (flight.sizes || {})[label] || {};
      return h("tr", { dataset: { label } },
        h("td", {}, swatch(label), ` ${label}`),
        h("td", { class: "num" }, String(flight.counts[label])),
        h("td", { class: "num" }, metres(size.min)),
        h("td", { class: "num" }, metres(size.median)),
        h("td", { class: "num" }, metres(size.max)));
    })));
}

function changeRows(found) {
  const rows = [];
  for (const kind of ["new", "gone", "moved"]) {
    for (const change of found[kind] || []) {
      const seen = change.after || change.before;
      rows.push(h("tr", { dataset: { kind } },
        h("td", {}, kind),
        h("td", {}, swatch(change.label), ` ${change.label}`),
        h("td", {}, h("a", { href: `/jobs/${seen.job_id}` }, `#${seen.job_id}`), ` detection ${seen.number}`),
        h("td", { class: "num" }, change.distance_m == null ? "–" : `${change.distance_m.toFixed(1)} m`)));
    }
  }
  if (!rows.length) return null;
  return h("table", { id: "changes-list" },
    h("thead", {}, h("tr", {}, ["Change", "Label", "Seen in", "Moved by"].map((t, i) => h("th", { class: i === 3 ? "num" : null }, t)))),
    h("tbody", {}, rows));
}

// "Compared with": another flight's changes up to this one, and this flight's report since it.
function compare(name, others, viewPath) {
  const shown = h("div", { id: "changes" });
  let latest = 0;
  const select = h("select", {
    id: "compare",
    onchange: async () => {
      const mine = ++latest;
      const other = select.value;
      if (!other) {
        shown.replaceChildren();
        return;
      }
      shown.replaceChildren(h("p", { class: "muted" }, "Comparing…"));
      try {
        const found = await json(`/v1/changes?${new URLSearchParams({ before: other, after: name })}`);
        if (mine !== latest) return;
        shown.replaceChildren(
          h("ul", { class: "changes-counts", id: "changes-counts" }, CHANGE_KINDS.map(([kind, text]) =>
            h("li", { dataset: { kind, count: found.counts[kind] || 0 } }, `${found.counts[kind] || 0} ${text}`))),
          changeRows(found),
          h("p", {}, reportLink(`${viewPath}?${new URLSearchParams({ since: other })}`, `Open the report since ${other}`, "report-since")));
      } catch (error) {
        if (mine === latest) shown.replaceChildren(errorBox(error));
      }
    },
  }, h("option", { value: "" }, "choose a flight"), others.map((id) => h("option", { value: id }, id)));
  return h("section", {},
    h("h2", {}, "What changed"),
    others.length
      ? [h("div", { class: "filters" }, h("label", {}, "Since flight", select)), shown]
      : h("p", { class: "muted" }, "No other flight to compare with."));
}

export async function render(root, name) {
  document.title = `Flight ${name} · aip`;
  root.replaceChildren(h("h1", {}, `Flight ${name}`), h("p", { class: "muted" }, "Loading…"));
  const encoded = encodeURIComponent(name);
  let flight;
  let all = [];
  try {
    [flight, all] = await Promise.all([
      json(`/v1/flights/${encoded}`),
      json("/v1/flights").then((body) => body.flights, () => []),
    ]);
  } catch (error) {
    root.replaceChildren(error.status === 404 ? missing(name) : errorBox(error));
    return;
  }
  const reportPath = `/v1/reports/${encoded}`;
  const message = h("div", { id: "report-message" });
  const fail = (error) => message.replaceChildren(errorBox(error));
  const pdf = async () => {
    message.replaceChildren(h("p", { class: "muted" }, "Printing the PDF…"));
    try {
      await download(`${reportPath}?format=pdf`, fileName(name, "pdf"));
      message.replaceChildren();
    } catch (error) {
      fail(error);
    }
  };
  const save = () => download(reportPath, fileName(name, "html")).catch(fail);
  const others = all.map((f) => f.id).filter((id) => id !== flight.id);
  root.replaceChildren(
    h("div", { class: "flight", id: "flight", dataset: { flight: flight.id } },
      h("p", {}, h("a", { href: "/flights" }, "All flights")),
      h("h1", {}, `Flight ${flight.id}`, flight.explicit ? null : h("span", { class: "tag" }, "auto")),
      summary(flight),
      h("div", { class: "flight-actions" },
        reportLink(`/reports/${encoded}`, "Open report", "report-open"),
        h("button", { type: "button", id: "report-download", onclick: save }, "Download report"),
        h("button", { type: "button", id: "report-pdf", onclick: pdf }, "Download PDF"),
        h("a", { href: `/map?${new URLSearchParams({ flight: flight.id })}`, id: "flight-map" }, "On the map")),
      message,
      h("h2", {}, "Detections per label"),
      h("p", {}, counts(flight.counts)),
      labels(flight),
      h("p", { class: "muted" }, "Sizes are each object's longest side on the ground."),
      h("h2", {}, `Jobs (${flight.job_ids.length})`),
      h("ul", { class: "flight-jobs", id: "flight-jobs" }, flight.job_ids.map((id) => h("li", {}, h("a", { href: `/jobs/${id}` }, `#${id}`)))),
      compare(flight.id, others, `/reports/${encoded}`)));
  // The path as the list links it: an id typed with raw slashes reads the same.
  if (location.pathname !== flightPath(flight.id)) history.replaceState(null, "", flightPath(flight.id));
}
