// Small helpers for building the page from data: elements are made with
// textContent only, never innerHTML, so a model or project name can never
// inject markup or script.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  node.append(...children.flat().filter((child) => child !== null && child !== undefined)
    .map((child) => (child instanceof Node ? child : String(child))));
  return node;
}

/** A table cell; `full` (e.g. a whole version hash) shows on hover when the text is shortened. */
export function cell(text, full) {
  return el("td", full ? { title: full } : {}, text ?? "—");
}

export function replaceRows(tbody, rows, columns) {
  const nothing = el("tr", {}, el("td", { colspan: columns, class: "empty" }, "none"));
  tbody.replaceChildren(...(rows.length ? rows : [nothing]));
}

/** Service units with six decimals, as the ledger counts them (micro-SU). */
export function formatSu(su) {
  return typeof su === "number" ? su.toFixed(6) : "—";
}

export function formatTime(epochSeconds) {
  return epochSeconds ? new Date(epochSeconds * 1000).toLocaleString() : "—";
}

export function formatSeconds(seconds) {
  if (typeof seconds !== "number") return "—";
  return seconds >= 120 ? `${Math.round(seconds / 60)} min` : `${seconds.toFixed(seconds < 10 ? 2 : 0)} s`;
}

/** Versions are content hashes: the first 12 characters tell them apart on a page. */
export function shortVersion(version) {
  return version ? version.slice(0, 12) : "—";
}

export function showError(where, error) {
  where.textContent = error ? `${error.message ?? error}` : "";
}
