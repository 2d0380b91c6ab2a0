// Service level objectives (`GET /tpm/v1/slo`): per request kind, p50/p95
// latency and availability over the service's window, against the targets
// the operator set in the federation file.

import { api } from "./api.js";
import { cell, el, formatSeconds, replaceRows } from "./dom.js";

export async function loadSlo() {
  const report = await api("/tpm/v1/slo");
  document.getElementById("slo-window").textContent = `over the last ${formatSeconds(report.window_s)}`;
  replaceRows(document.getElementById("slo-rows"), report.kinds.map((row) => el("tr", { data: { kind: row.kind } },
    cell(row.kind),
    cell(`${row.requests} (${row.refused} refused, ${row.failed} failed)`),
    cell(formatSeconds(row.p50_s ?? undefined)),
    cell(formatSeconds(row.p95_s ?? undefined)),
    cell(percent(row.availability)),
    cell(row.target
      ? `p95 ≤ ${formatSeconds(row.target.p95_latency_s)}, availability ≥ ${percent(row.target.availability)}`
      : "none"),
    el("td", {}, verdict(row.met)),
  )), 7);
}

function percent(share) {
  return typeof share === "number" ? `${(share * 100).toFixed(2)} %` : "—";
}

function verdict(met) {
  if (!met) return "—";
  const ok = met.latency && met.availability;
  const missed = [!met.latency && "latency", !met.availability && "availability"].filter(Boolean).join(", ");
  return el("span", { class: `badge ${ok ? "running" : "failed"}` }, ok ? "met" : `missed: ${missed}`);
}
