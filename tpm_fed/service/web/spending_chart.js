// Spending over time: each project's cumulative charged service units as a
// step line, drawn as plain SVG (no chart library to vendor).

const WIDTH = 640, HEIGHT = 220, PAD = { left: 70, right: 16, top: 12, bottom: 28 };
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"];
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Per project: [[time, cumulative SU], ...] in time order. */
export function cumulativeSpending(charges) {
  const byProject = new Map();
  for (const charge of [...charges].sort((a, b) => a.created_at - b.created_at)) {
    const series = byProject.get(charge.project) ?? [];
    const total = (series.at(-1)?.[1] ?? 0) + (charge.charged_su ?? 0);
    series.push([charge.created_at, total]);
    byProject.set(charge.project, series);
  }
  return byProject;
}

export function drawSpendingChart(container, charges) {
  const byProject = cumulativeSpending(charges);
  if (!byProject.size) {
    container.replaceChildren("No charges yet.");
    return;
  }
  const points = [...byProject.values()].flat();
  const start = Math.min(...points.map(([t]) => t)), end = Math.max(...points.map(([t]) => t));
  const top = Math.max(...points.map(([, su]) => su)) || 1;
  const span = end - start || 1;
  const x = (t) => PAD.left + ((t - start) / span) * (WIDTH - PAD.left - PAD.right);
  const y = (su) => HEIGHT - PAD.bottom - (su / top) * (HEIGHT - PAD.top - PAD.bottom);

  const chart = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, width: WIDTH, height: HEIGHT, role: "img",
    "aria-label": "cumulative service units charged per project over time" });
  chart.append(
    svg("line", { x1: PAD.left, y1: y(0), x2: WIDTH - PAD.right, y2: y(0), stroke: "#888" }),
    svg("line", { x1: PAD.left, y1: y(0), x2: PAD.left, y2: PAD.top, stroke: "#888" }),
    svg("text", { x: PAD.left - 6, y: y(top) + 4, "text-anchor": "end", "font-size": 11 }, `${top.toFixed(4)} SU`),
    svg("text", { x: PAD.left - 6, y: y(0) + 4, "text-anchor": "end", "font-size": 11 }, "0"),
    svg("text", { x: PAD.left, y: HEIGHT - 8, "font-size": 11 }, new Date(start * 1000).toLocaleTimeString()),
    svg("text", { x: WIDTH - PAD.right, y: HEIGHT - 8, "text-anchor": "end", "font-size": 11 },
      new Date(end * 1000).toLocaleTimeString()),
  );
  const legend = document.createElement("ul");
  legend.className = "legend";
  [...byProject.entries()].forEach(([project, series], index) => {
    const color = COLORS[index % COLORS.length];
    // A step line: spending stays flat between charges, then jumps.
    let path = `M ${x(series[0][0])} ${y(0)}`;
    for (const [t, su] of series) path += ` H ${x(t)} V ${y(su)}`;
    path += ` H ${x(end)}`;
    chart.append(svg("path", { d: path, fill: "none", stroke: color, "stroke-width": 2, "data-project": project }));
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = color;
    item.append(swatch, `${project}: ${series.at(-1)[1].toFixed(6)} SU`);
    legend.append(item);
  });
  container.replaceChildren(chart, legend);
}
