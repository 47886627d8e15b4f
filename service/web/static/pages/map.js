// Map: geotagged frames as points on a plain projected plane (no tiles from anywhere), with a
// scale bar and a north arrow; points close on screen are drawn as one cluster with a count.
// Under them, each frame's ground footprint and each located detection, coloured by label.
// Each point links to its job; a cluster, clicked, lists its jobs beside the map and zooms in
// to its extent. Positions come from the GeoJSON export, of one flight when one is chosen.

import { json, request } from "../api.js";
import { colour, errorBox, h, s } from "../dom.js";

const W = 800;
const H = 500;
const PAD = 40;
const CLUSTER_PX = 24;
const EARTH_M_PER_DEG = 111320;
const MIN_SPAN = 0.002; // degrees
const ZOOM_MIN_SPAN = 0.00005; // degrees: ~5 m, so frames a few metres apart come apart

// Every [lon, lat] of a feature: its point, or its polygon's rings.
function positions(feature) {
  const g = feature.geometry || {};
  if (g.type === "Point") return [g.coordinates];
  if (g.type === "Polygon") return g.coordinates.flat();
  return [];
}

function project(coordinates, minSpan = MIN_SPAN) {
  const lons = coordinates.map((c) => c[0]);
  const lats = coordinates.map((c) => c[1]);
  const mid = (Math.min(...lats) + Math.max(...lats)) / 2;
  const k = Math.cos((mid * Math.PI) / 180);
  // Metres east and north of the south-west corner, then one scale for both axes.
  const x0 = Math.min(...lons);
  const y0 = Math.min(...lats);
  // At least ~200 m across, so one frame (or a few on one spot) still gets a true scale.
  const spanX = Math.max((Math.max(...lons) - x0) * k, minSpan);
  const spanY = Math.max(Math.max(...lats) - y0, minSpan);
  const scale = Math.min((W - 2 * PAD) / spanX, (H - 2 * PAD) / spanY);
  // Centred: the frames' extent in the middle of the plane.
  const left = (W - ((Math.max(...lons) - x0) * k * scale)) / 2;
  const bottom = (H + ((Math.max(...lats) - y0) * scale)) / 2;
  return {
    at: ([lon, lat]) => [left + (lon - x0) * k * scale, bottom - (lat - y0) * scale],
    metresPerPx: EARTH_M_PER_DEG / scale,
  };
}

function clusters(points) {
  const out = [];
  for (const p of points) {
    const near = out.find((c) => Math.hypot(c.x - p.x, c.y - p.y) < CLUSTER_PX);
    if (near) {
      near.members.push(p);
      near.x = near.members.reduce((a, m) => a + m.x, 0) / near.members.length;
      near.y = near.members.reduce((a, m) => a + m.y, 0) / near.members.length;
    } else out.push({ x: p.x, y: p.y, members: [p] });
  }
  return out;
}

function scaleBar(metresPerPx) {
  const target = metresPerPx * 150;
  const step = 10 ** Math.floor(Math.log10(target));
  const metres = [1, 2, 5, 10].map((m) => m * step).filter((m) => m <= target).pop() || step;
  const px = metres / metresPerPx;
  const text = metres >= 1000 ? `${metres / 1000} km` : `${metres} m`;
  return s("g", { class: "scale", id: "scale" },
    s("line", { x1: PAD, y1: H - 14, x2: PAD + px, y2: H - 14 }),
    s("line", { x1: PAD, y1: H - 20, x2: PAD, y2: H - 8 }), s("line", { x1: PAD + px, y1: H - 20, x2: PAD + px, y2: H - 8 }),
    s("text", { x: PAD + px + 6, y: H - 10 }, text));
}

function northArrow() {
  return s("g", { class: "north", id: "north", transform: `translate(${W - 30},40)` },
    s("path", { d: "M0,-22 L9,8 L0,2 L-9,8 Z" }), s("text", { x: 0, y: 22, "text-anchor": "middle" }, "N"));
}

function size(p) {
  if (p.width_m == null || p.height_m == null) return "size unknown";
  return `${p.width_m.toFixed(1)} × ${p.height_m.toFixed(1)} m`;
}

// A located detection: its ground polygon (or a dot where only its centre is known), linked
// to its job.
function detectionShape(f, at) {
  const p = f.properties;
  const fill = colour(String(p.label));
  const shape = f.geometry.type === "Polygon"
    ? s("polygon", { points: f.geometry.coordinates[0].map((c) => at(c).join(",")).join(" "), fill, stroke: fill })
    : s("circle", { cx: at(f.geometry.coordinates)[0], cy: at(f.geometry.coordinates)[1], r: 3, fill });
  return s("a", { href: `/jobs/${p.job_id}`, class: "detection", dataset: { label: p.label, job: p.job_id } },
    s("title", {}, `${p.label} ${size(p)} · job #${p.job_id} detection ${p.number}`), shape);
}

// The plane for `focus` (all frames, or one cluster's), with every frame that falls on it, and
// the footprints and detections beneath; a cluster calls onCluster with its members.
function plane(layers, focus, onCluster) {
  const { frames: features, footprints, detections } = layers;
  const whole = focus === features;
  const jobs = new Set(focus.map((f) => f.properties.job_id));
  const extent = [...focus, ...[...footprints, ...detections].filter((f) => whole || jobs.has(f.properties.job_id))];
  const projection = project(extent.flatMap(positions), whole ? MIN_SPAN : ZOOM_MIN_SPAN);
  const ring = (f) => f.geometry.coordinates[0].map((c) => projection.at(c).join(",")).join(" ");
  const points = features.map((f) => {
    const [x, y] = projection.at(f.geometry.coordinates);
    return { x, y, id: f.properties.job_id, name: f.properties.name, feature: f };
  }).filter((p) => p.x >= 0 && p.x <= W && p.y >= 0 && p.y <= H);
  const svg = s("svg", { class: "map", id: "map", viewBox: `0 0 ${W} ${H}`, role: "img" },
    s("rect", { x: 0, y: 0, width: W, height: H, class: "ground" }),
    s("g", { class: "footprints" }, footprints.map((f) => s("polygon", { class: "footprint", points: ring(f), dataset: { job: f.properties.job_id } },
      s("title", {}, `#${f.properties.job_id} ${f.properties.name} on the ground`)))),
    s("g", { class: "detections" }, detections.map((f) => detectionShape(f, projection.at))));
  for (const c of clusters(points)) {
    if (c.members.length === 1) {
      const p = c.members[0];
      svg.append(s("a", { href: `/jobs/${p.id}`, class: "point" }, s("circle", { cx: p.x, cy: p.y, r: 6 }), s("title", {}, `#${p.id} ${p.name}`)));
    } else {
      const r = 9 + Math.min(16, Math.sqrt(c.members.length) * 3);
      const open = () => onCluster(c.members);
      svg.append(s("g", {
        class: "cluster", role: "button", tabindex: 0, "aria-label": `${c.members.length} frames: list them`,
        onclick: open, onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } },
      },
      s("circle", { cx: c.x, cy: c.y, r }),
      s("text", { x: c.x, y: c.y + 4, "text-anchor": "middle" }, String(c.members.length)),
      s("title", {}, c.members.map((m) => `#${m.id}`).join(" "))));
    }
  }
  svg.append(scaleBar(projection.metresPerPx), northArrow());
  return svg;
}

// Frames (camera points), their footprints and the located detections, by `kind`; a feature
// without one is a frame point, as exports before footprints wrote them.
function layers(all) {
  const kind = (f) => (f.properties || {}).kind || (f.geometry && f.geometry.type === "Point" ? "frame" : "");
  const of = (k) => all.filter((f) => kind(f) === k && positions(f).length);
  return { frames: of("frame"), footprints: of("footprint"), detections: of("detection") };
}

// A select of the flights (GET /v1/flights); empty when none are known or they cannot be read.
async function flightSelect(chosen, onChange) {
  let flights = [];
  try {
    flights = (await json("/v1/flights")).flights || [];
  } catch {
    return null;
  }
  if (!flights.length && !chosen) return null;
  const ids = flights.map((f) => f.id);
  if (chosen && !ids.includes(chosen)) ids.unshift(chosen);
  const select = h("select", { id: "map-flight", onchange: () => onChange(select.value) },
    h("option", { value: "" }, "All flights"),
    ids.map((id) => h("option", { value: id, selected: id === chosen }, id)));
  return h("label", {}, "Flight", select);
}

export async function render(root) {
  const chosen = new URLSearchParams(location.search).get("flight") || "";
  const reload = (flight) => {
    const query = flight ? `?${new URLSearchParams({ flight })}` : "";
    history.replaceState(null, "", `/map${query}`);
    render(root);
  };
  root.replaceChildren(h("h1", {}, "Map"), h("p", { class: "muted" }, "Loading…"));
  try {
    const query = chosen ? `?${new URLSearchParams({ flight: chosen })}` : "";
    const [response, picker] = await Promise.all([request(`/v1/exports/jobs.geojson${query}`), flightSelect(chosen, reload)]);
    if (!response.ok) throw new Error((await response.json()).message);
    const all = (await response.json()).features || [];
    const layered = layers(all);
    const features = layered.frames;
    const filters = h("div", { class: "filters" }, picker);
    if (!features.length) {
      const none = chosen ? "No geotagged frames in this flight." : "No geotagged frames yet: images with GPS EXIF appear here.";
      root.replaceChildren(h("h1", {}, "Map"), filters, h("p", { class: "muted", id: "map-empty" }, none));
      return;
    }
    const area = h("div", { class: "map-area" });
    const panel = h("aside", { class: "map-panel", id: "map-panel" });
    const show = (focus) => area.replaceChildren(plane(layered, focus, pick));
    const overview = () => {
      panel.replaceChildren(h("p", { class: "muted" }, "Click a cluster to list its frames."));
      show(features);
    };
    function pick(members) {
      panel.replaceChildren(
        h("h2", {}, `${members.length} frames here`),
        h("ul", { id: "cluster-jobs" }, members.map((m) => h("li", {}, h("a", { href: `/jobs/${m.id}` }, `#${m.id} ${m.name}`)))),
        h("button", { type: "button", id: "map-all", onclick: overview }, "Show all frames"));
      show(members.map((m) => m.feature));
    }
    overview();
    const located = layered.detections.length;
    root.replaceChildren(h("h1", {}, "Map"), filters,
      h("p", { class: "muted", id: "map-summary" }, `${features.length} geotagged frames, ${layered.footprints.length} on the ground, ${located} located detections`),
      h("div", { class: "map-layout" }, area, panel));
  } catch (error) {
    root.replaceChildren(h("h1", {}, "Map"), errorBox(error));
  }
}
