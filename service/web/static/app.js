// The dashboard's entry: picks the page module from the path and draws it into <main>; a path
// no page has gets the dashboard's own "not found" (the server answered it with a 404).

import { errorBox, h } from "./dom.js";

const ROUTES = [
  [/^\/$/, "jobs", () => import("./pages/jobs.js")],
  // Any segment: the job page itself tells "not a job id" from "no such job".
  [/^\/jobs\/([^/]+)$/, "jobs", () => import("./pages/job.js")],
  [/^\/submit$/, "submit", () => import("./pages/submit.js")],
  [/^\/models$/, "models", () => import("./pages/models.js")],
  [/^\/inbox$/, "inbox", () => import("./pages/inbox.js")],
  [/^\/stats$/, "stats", () => import("./pages/stats.js")],
  [/^\/map$/, "map", () => import("./pages/map.js")],
  [/^\/flights$/, "flights", () => import("./pages/flights.js")],
  // A flight's id, encoded as one segment; its raw slashes (an inbox folder's) also reach it.
  [/^\/flights\/(.+)$/, "flights", () => import("./pages/flight.js")],
  [/^\/reports\/(.+)$/, "flights", () => import("./pages/flight-report.js")],
  [/^\/nodes$/, "nodes", () => import("./pages/nodes.js")],
];

function decoded(part) {
  try {
    return decodeURIComponent(part);
  } catch {
    return part; // a stray % is shown as typed
  }
}

function notFound(path) {
  document.title = "Not found · aip";
  return h("div", { id: "not-found" },
    h("h1", {}, "Not found"),
    h("p", {}, "There is no page at ", h("code", {}, decoded(path)), "."),
    h("p", {}, h("a", { href: "/" }, "All jobs")));
}

async function main() {
  const root = document.getElementById("app");
  const path = location.pathname.replace(/\/+$/, "") || "/";
  for (const [pattern, nav, load] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    for (const link of document.querySelectorAll("nav a")) {
      link.classList.toggle("current", link.dataset.page === nav);
    }
    try {
      const page = await load();
      await page.render(root, ...match.slice(1).map(decoded));
    } catch (error) {
      root.replaceChildren(errorBox(error));
    }
    return;
  }
  root.replaceChildren(notFound(path));
}

main();
