// My projects: allocations, spending over time, recent requests with their
// status, charge and exact version. The API decides what is readable: a
// member sees their projects, an operator every project.

import { api } from "./api.js";
import { cell, el, formatSeconds, formatSu, formatTime, replaceRows, shortVersion } from "./dom.js";
import { drawSpendingChart } from "./spending_chart.js";

const RECENT = 20;

export async function loadProjects() {
  const [me, allocations, usage] = await Promise.all([
    api("/tpm/v1/whoami"), api("/tpm/v1/allocations"), api("/tpm/v1/usage")]);
  document.getElementById("projects-title").textContent = me.operator ? "Projects (operator: all)" : "My projects";
  document.getElementById("projects-scope").textContent = me.operator
    ? `${me.identity} is an operator and sees every project.`
    : `${me.identity} is a member of ${me.projects.length ? me.projects.join(", ") : "no project"}.`;

  replaceRows(document.getElementById("allocations-rows"), allocations.allocations.map((a) => el("tr", {},
    cell(a.project), cell(a.site), cell(formatSu(a.granted_su)), cell(formatSu(a.spent_su)),
    cell(formatSu(a.reserved_su)), cell(formatSu(a.available_su)))), 6);

  drawSpendingChart(document.getElementById("spending-chart"), usage.charges);

  const recent = [...usage.charges].sort((a, b) => b.created_at - a.created_at).slice(0, RECENT);
  // A charge says what was billed; the request's own record says whether it ran (and, while it
  // waits, where it stands in the queue).
  const records = await Promise.all(recent.map((charge) =>
    api(`/tpm/v1/requests/${encodeURIComponent(charge.request_id)}`).catch(() => null)));
  replaceRows(document.getElementById("usage-rows"), recent.map((charge, index) =>
    el("tr", { data: { requestId: charge.request_id } },
      cell(formatTime(charge.created_at)),
      cell(charge.request_id),
      cell(charge.project),
      cell(charge.identity),
      cell(charge.model),
      cell(shortVersion(charge.version), charge.version),
      cell(charge.kind),
      cell(status(charge, records[index])),
      el("td", { class: "charge" }, formatSu(charge.charged_su)),
    )), 9);
}

function status(charge, record) {
  const parts = [record?.status ?? "unknown"];
  if (typeof record?.queue_position === "number") {
    const start = formatSeconds(record.estimated_start_s);
    parts.push(`(place ${record.queue_position} in its queue, starts in about ${start})`);
  }
  if (charge.state !== "settled") parts.push(`(charge ${charge.state})`);
  if (record?.error) parts.push(`: ${record.error}`);
  return parts.join(" ");
}
