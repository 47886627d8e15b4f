// Inbox: the watched folder, how it watches, the files waiting and why, counts since start,
// and the recent filings and failures (inbox jobs, and rejections as they happen).

import { json, live } from "../api.js";
import { badge, errorBox, h, when } from "../dom.js";

export async function render(root) {
  const status = h("div", { id: "inbox" });
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
      const page = await json("/v1/jobs?source=inbox&limit=25");
      recent.replaceChildren(...page.jobs.map((job) => h("tr", {},
        h("td", {}, h("a", { href: `/jobs/${job.id}` }, `#${job.id}`)), h("td", {}, job.source_path || job.input.name),
        h("td", {}, badge(job.status)), h("td", {}, job.error ? job.error.message : ""), h("td", {}, when(job.created_at)))));
    } catch (error) {
      status.replaceChildren(errorBox(error));
    }
  }

  root.replaceChildren(h("h1", {}, "Inbox"), status,
    h("h2", {}, "Recent filings"),
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
