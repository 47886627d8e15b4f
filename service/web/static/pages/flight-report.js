// A flight's report opened from the dashboard (/reports/{id}[?since=OTHER]): read from the API
// with the token (a link to /v1/reports cannot carry it) and shown as this whole document.
// The report is one self-contained file with its own inline styles; this path alone may use
// them (service/api/pages.py), and its own policy still forbids scripts and other origins.

import { ApiError, request } from "../api.js";
import { errorBox, h } from "../dom.js";

export async function render(root, name) {
  window.opener = null; // opened from a flight page, which this tab needs nothing from
  document.title = `Report ${name} · aip`;
  root.replaceChildren(h("h1", {}, `Report of flight ${name}`), h("p", { class: "muted", id: "report-loading" }, "Preparing the report…"));
  const since = new URLSearchParams(location.search).get("since");
  const query = since ? `?${new URLSearchParams({ since })}` : "";
  let html;
  try {
    const response = await request(`/v1/reports/${encodeURIComponent(name)}${query}`);
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    html = await response.text();
  } catch (error) {
    root.replaceChildren(h("h1", {}, `Report of flight ${name}`), errorBox(error),
      h("p", {}, h("a", { href: `/flights/${encodeURIComponent(name)}` }, "The flight"), " · ", h("a", { href: "/flights" }, "All flights")));
    return;
  }
  // Parsed inert (scripts in a parsed document never run), then put in place of this page.
  const report = new DOMParser().parseFromString(html, "text/html");
  document.replaceChild(document.adoptNode(report.documentElement), document.documentElement);
}
