// Models: each role's state, source, revision, quantisation and resident bytes against the
// memory budget, load progress live, and the load/unload buttons.

import { json, live, post } from "../api.js";
import { bytes, errorBox, h, when } from "../dom.js";

function meter(used, budget) {
  const bar = h("div", { class: "meter" });
  const fill = h("span");
  fill.style.width = budget ? `${Math.min(100, (100 * (used || 0)) / budget)}%` : "0%";
  bar.append(fill);
  return h("div", {}, bar, h("p", { class: "muted" }, `${bytes(used)}${budget ? ` of ${bytes(budget)} budget` : ""}`));
}

function card(role, budget, act) {
  const busy = role.state === "loading";
  const progress = role.progress
    ? h("div", { class: "progress" }, h("progress", { max: 100, value: role.progress.percent ?? undefined }),
      ` ${role.progress.phase}${role.progress.percent != null ? ` ${Math.round(role.progress.percent)}%` : ""}`)
    : "";
  const facts = [
    ["Source", role.source], ["Revision", role.revision], ["Quantised", role.quantize ? `${role.quantize}-bit` : "no"],
    ["Loaded", when(role.loaded_at)], ["Load time", role.load_seconds != null ? `${role.load_seconds.toFixed(1)} s` : null],
    ["Jobs served", role.jobs_served], ["Keep alive", role.keep_alive],
  ].filter(([, v]) => v != null && v !== "");
  return h("article", { class: "card", dataset: { role: role.role, state: role.state } },
    h("h2", {}, role.role, " ", h("span", { class: `status status-${role.state}` }, role.state)),
    h("dl", {}, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])),
    meter(role.resident_bytes, budget),
    progress,
    role.error ? h("p", { class: "error" }, role.error) : "",
    h("div", { class: "toolbar" },
      h("button", { type: "button", class: "load", disabled: busy, onclick: () => act(role.role, "load") }, role.state === "loaded" ? "Reload" : "Load"),
      h("button", { type: "button", class: "unload", disabled: busy || role.state !== "loaded", onclick: () => act(role.role, "unload") }, "Unload")));
}

export async function render(root) {
  const message = h("div", { class: "message" });
  const cards = h("div", { class: "cards", id: "models" });
  const summary = h("p", { class: "muted" });
  let again = null;

  async function load() {
    try {
      const report = await json("/v1/models");
      cards.replaceChildren(...report.roles.map((role) => card(role, report.budget_bytes, act)));
      summary.textContent = `held ${bytes(report.held_bytes)}${report.budget_bytes ? ` of a ${bytes(report.budget_bytes)} budget` : ""}` +
        (report.prefix_cache_bytes ? ` · prefix cache ${bytes(report.prefix_cache_bytes)}` : "");
      // While a load runs, read again soon: its progress shows even without the stream.
      if (!again && report.roles.some((r) => r.state === "loading")) {
        again = setTimeout(() => { again = null; load(); }, 500);
      }
    } catch (error) {
      message.replaceChildren(errorBox(error));
    }
  }

  async function act(role, action) {
    message.replaceChildren();
    try {
      await post(`/v1/models/${role}/${action}`);
    } catch (error) {
      message.replaceChildren(errorBox(error));
    }
    await load();
  }

  root.replaceChildren(h("h1", {}, "Models"), summary, message, cards);
  await load();
  let pending = null;
  const soon = () => {
    // Progress comes in bursts: one redraw for each.
    if (!pending) pending = setTimeout(() => { pending = null; load(); }, 200);
  };
  live({ onEvent: (event) => { if (event.type.startsWith("model.")) soon(); }, poll: load, every: 3000 });
}
