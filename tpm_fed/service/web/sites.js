// Sites and their replicas (`GET /tpm/v1/sites`): health, capacity, tasks in
// flight, keep-alive; per replica its state and queue depth, and when it will
// stop if nothing else arrives (last use + its site's keep-alive).

import { api } from "./api.js";
import { cell, el, formatSeconds, formatTime, replaceRows, shortVersion } from "./dom.js";

export async function loadSites() {
  const report = await api("/tpm/v1/sites");
  const keepAlive = Object.fromEntries(report.sites.map((site) => [site.name, site.keep_alive_s]));
  replaceRows(document.getElementById("sites-rows"), report.sites.map((site) => el("tr", { data: { site: site.name } },
    el("td", {}, el("strong", {}, site.name)),
    cell(site.access),
    el("td", {}, el("span", { class: `badge ${site.state}` }, site.state)),
    cell(capacity(site)),
    cell(`${site.outstanding_tasks}`),
    cell(formatSeconds(site.keep_alive_s)),
    cell(site.billing), cell(site.owner), cell(site.location), cell(site.detail || ""),
  )), 10);
  const now = Date.now() / 1000;
  replaceRows(document.getElementById("replicas-rows"), report.replicas.map((replica) => el("tr", {},
    cell(replica.replica_id),
    cell(replica.site),
    cell(replica.model),
    cell(shortVersion(replica.version), replica.version),
    el("td", {}, el("span", { class: `badge ${replica.state}` }, replica.state)),
    cell(`${replica.queue_depth}`),
    cell(formatSeconds(replica.service_s)),
    cell(formatTime(replica.last_used)),
    cell(idleStop(replica, keepAlive[replica.site], now)),
  )), 9);
}

function capacity(site) {
  const workers = `${site.workers} worker${site.workers === 1 ? "" : "s"}`;
  return site.max_replicas === undefined ? workers : `${workers}, at most ${site.max_replicas} replicas`;
}

function idleStop(replica, keepAliveS, now) {
  if (replica.state !== "warm" || typeof keepAliveS !== "number" || !replica.last_used) return "—";
  if (replica.queue_depth > 0) return "busy";
  return formatSeconds(Math.max(0, replica.last_used + keepAliveS - now));
}
