// The dashboard's entry: picks the page module from the path and draws it into <main>.

import { errorBox } from "./dom.js";

const ROUTES = [
  [/^\/$/, "jobs", () => import("./pages/jobs.js")],
  [/^\/jobs\/(\d+)$/, "jobs", () => import("./pages/job.js")],
  [/^\/submit$/, "submit", () => import("./pages/submit.js")],
  [/^\/models$/, "models", () => import("./pages/models.js")],
  [/^\/inbox$/, "inbox", () => import("./pages/inbox.js")],
  [/^\/stats$/, "stats", () => import("./pages/stats.js")],
  [/^\/map$/, "map", () => import("./pages/map.js")],
];

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
      await page.render(root, ...match.slice(1));
    } catch (error) {
      root.replaceChildren(errorBox(error));
    }
    return;
  }
  root.replaceChildren(errorBox(new Error(`no page at ${path}`)));
}

main();
