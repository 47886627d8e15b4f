// Inbox: the watched folder, how it watches, the files waiting and why, counts since start,
// the last files the ledger recorded (failures with their reasons, kept across restarts), the
// recent inbox jobs, and rejections as they happen.

import { json, live } from "../api.js";
import { badge, errorBox, h, when } from "../dom.js";

export async function render(root) {
  const status = h("div", { id: "inbox" });
  const ledger = h("tbody", { id: "inbox-recent" });
  const recent = h("tbody", { id: "filings" });
  const rejected = h("ul", { id: "rejections" });

  async function load() {
    try {
      const inbox = await json("/v1/inbox");
      if (!inbox.enabled) {
        status.replaceChildren(h("p", {}, "The inbox is off (AIP_INBOX_ENABLED=0)."));
        return;
      }
      const counts = inbox.since_start || {};
      status.replaceChildren(h("dl", {},
        h("dt", {}, "Folder"), h("dd", {}, h("code", {}, inbox.path)),
        h("dt", {}, "Mode"), h("dd", { id: "inbox-mode" }, inbox.mode),
        h("dt", {}, "Files"), h("dd", {}, inbox.moving ? "filed to processed/ or failed/" : "left in place"),
        h("dt", {}, "Waiting"), h("dd", {}, String(inbox.pending ?? 0)),
        h("dt", {}, "Last scan"), h("dd", {}, when(inbox.last_scan_at)),
        h("dt", {}, "Since start"), h("dd", {}, Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(" · "))),
        Object.keys(inbox.waiting || {}).length
          ? h("ul", {}, Object.entries(inbox.waiting).map(([file, why]) => h("li", {}, h("code", {}, file), ` ${why}`)))
          : "");
      ledger.replaceChildren(...(inbox.recent || []).map(filingRow));
      const page = await json("/v1/jobs?source=inbox&limit=25");
      recent.replaceChildren(...page.jobs.map((job) => h("tr", {},
        h("td", {}, h("a", { href: `/jobs/${job.id}` }, `#${job.id}`)), h("td", {}, job.source_path || job.input.name),
        h("td", {}, badge(job.status)), h("td", {}, job.error ? job.error.message : ""), h("td", {}, when(job.created_at)))));
    } catch (error) {
      status.replaceChildren(errorBox(error));
    }
  }

  root.replaceChildren(h("h1", {}, "Inbox"), status,
    h("h2", {}, "Last files handled"),
    h("table", {}, h("thead", {}, h("tr", {}, ["File", "Outcome", "Job", "Reason", "When"].map((t) => h("th", {}, t)))), ledger),
    h("h2", {}, "Recent inbox jobs"),
    h("table", {}, h("thead", {}, h("tr", {}, ["Job", "File", "Status", "Reason", "Created"].map((t) => h("th", {}, t)))), recent),
    h("h2", {}, "Refused since this page opened"), rejected);
  await load();
  live({
    onEvent: (event) => {
      if (event.type === "inbox.rejected") {
        rejected.prepend(h("li", {}, h("code", {}, event.data.path || ""), ` ${event.data.message || event.data.code || ""}`));
      }
      if (event.type.startsWith("inbox.") || event.type === "job.succeeded" || event.type === "job.failed") load();
    },
    poll: load,
    every: 5000,
  });
}

// A rejection is marked failed, with its code and message; other outcomes link their job.
function filingRow(filing) {
  const refused = filing.outcome === "rejected";
  const reason = refused ? [h("code", {}, filing.code || "rejected"), ` ${filing.message || ""}`] : "";
  return h("tr", { class: refused ? "filing-rejected" : null, dataset: { outcome: filing.outcome } },
    h("td", {}, h("code", {}, filing.path)),
    h("td", {}, refused ? h("span", { class: "status status-failed" }, "rejected") : badge(filing.outcome)),
    h("td", {}, filing.job_id ? h("a", { href: `/jobs/${filing.job_id}` }, `#${filing.job_id}`) : "–"),
    h("td", { class: refused ? "error" : null }, reason),
    h("td", {}, when(filing.at)));
}
