// Models: each one's exact version, its stored versions and tags, the modes
// (request kinds) it serves, and per site whether a replica is hot,
// starting or cold (`GET /v1/models`, the `tpm` object of each card).

import { api } from "./api.js";
import { cell, el, replaceRows, shortVersion } from "./dom.js";

const MODES = { generate: "query", embed: "custom embeddings", trace: "intermediary access" };

export async function loadModels() {
  const cards = (await api("/v1/models")).data;
  const rows = cards.map((card) => {
    const tpm = card.tpm ?? {};
    return el("tr", { data: { model: card.id } },
      el("td", {}, el("strong", {}, card.id), tpm.problem ? el("div", { class: "error" }, tpm.problem) : null),
      cell(shortVersion(tpm.version), tpm.version),
      el("td", {}, otherVersions(tpm)),
      cell((tpm.kinds ?? []).map((kind) => `${MODES[kind] ?? kind} (${kind})`).join(", ")),
      cell([tpm.backend, tpm.dtype].filter(Boolean).join(", ")),
      el("td", {}, Object.entries(tpm.sites ?? {}).map(([site, warmth]) =>
        el("span", { class: `badge ${warmth}`, data: { site } }, `${site}: ${warmth}`))),
    );
  });
  replaceRows(document.getElementById("models-rows"), rows, 6);
  return cards;
}

function otherVersions(tpm) {
  const versions = tpm.versions ?? [];
  if (!versions.length) return tpm.source === "directory" ? "one folder (no store versions)" : "—";
  return versions.map((v) => el("div", { title: v.version },
    shortVersion(v.version),
    v.tags?.length ? ` [${v.tags.join(", ")}]` : "",
    v.version === tpm.version ? " (serving)" : ""));
}
