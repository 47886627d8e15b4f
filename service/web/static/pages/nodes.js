// Nodes: every process that serves the API or works the queue on this store (GET /v1/nodes):
// its state (alive, lost: heartbeats late, stopped), role, models, profiles, current job and
// jobs done, read again every few seconds.

import { json } from "../api.js";
import { errorBox, h, when } from "../dom.js";

const STATE_CLASS = { alive: "succeeded", lost: "failed", stopped: "unloaded" };

function models(node) {
  return Object.entries(node.models || {}).map(([role, model]) => `${role}: ${model.id || "?"}`).join(" · ");
}

function row(node) {
  return h("tr", { dataset: { node: node.id, state: node.state } },
    h("td", {}, h("code", {}, node.id)),
    h("td", {}, node.role),
    h("td", {}, h("span", { class: `status status-${STATE_CLASS[node.state] || "queued"}` }, node.state)),
    h("td", {}, node.current_job != null ? h("a", { href: `/jobs/${node.current_job}` }, `#${node.current_job}`) : "–"),
    h("td", {}, String(node.jobs_done)),
    h("td", {}, node.profiles ? node.profiles.join(", ") : "all"),
    h("td", {}, models(node)),
    h("td", {}, when(node.started_at)),
    h("td", {}, `${node.seconds_since_heartbeat} s ago`));
}

export async function render(root) {
  const message = h("div", { class: "message" });
  const body = h("tbody", { id: "nodes" });

  async function load() {
    try {
      const answer = await json("/v1/nodes");
      body.replaceChildren(...answer.nodes.map(row));
      message.replaceChildren();
    } catch (error) {
      message.replaceChildren(errorBox(error));
    }
  }

  const heads = ["Node", "Role", "State", "Job", "Jobs done", "Profiles", "Models", "Started", "Last heartbeat"];
  root.replaceChildren(h("h1", {}, "Nodes"), message,
    h("table", {}, h("thead", {}, h("tr", {}, heads.map((t) => h("th", {}, t)))), body));
  await load();
  setInterval(load, 5000);
}
