// The page's entry point: sign in (from the token link, the form, or this
// tab's session), then one tab at a time, each loading fresh data when shown.

import { api, currentToken, forgetToken, takeTokenFromLink } from "./api.js";
import { showError } from "./dom.js";
import { loadModels } from "./models.js";
import { offerModels, setUpPlayground } from "./playground.js";
import { loadProjects } from "./projects.js";
import { hideSignIn, showSignIn } from "./sign_in.js";
import { loadSites } from "./sites.js";
import { loadSlo } from "./slo.js";

const LOADERS = {
  models: loadModels,
  playground: async () => offerModels(await loadModels()),
  sites: () => Promise.all([loadSites(), loadSlo()]),
  projects: loadProjects,
};

const tabs = document.getElementById("tabs");

async function showTab(name) {
  for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.id !== name;
  for (const button of tabs.querySelectorAll("button")) {
    button.setAttribute("aria-current", button.dataset.tab === name ? "page" : "false");
  }
  const where = document.getElementById(name);
  const problem = where.querySelector(":scope > .load-error") ?? where.appendChild(document.createElement("p"));
  problem.className = "load-error error";
  try {
    await LOADERS[name]();
    showError(problem, null);
  } catch (error) {
    showError(problem, error);
  } finally {
    where.dataset.loaded = String(Date.now()); // loaded or failed: either way, the tab says so
  }
}

function enter(me) {
  hideSignIn();
  tabs.hidden = false;
  document.getElementById("who").textContent = `${me.identity}${me.operator ? " (operator)" : ""}`;
  document.getElementById("sign-out").hidden = false;
  showTab("models");
}

function leave(message) {
  forgetToken();
  tabs.hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("sign-out").hidden = true;
  for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = true;
  showSignIn(message, enter);
}

tabs.addEventListener("click", (event) => {
  const name = event.target.dataset?.tab;
  if (name) showTab(name);
});
document.getElementById("sign-out").addEventListener("click", () => leave(""));
window.addEventListener("tpm-unauthenticated", (event) => leave(`signed out: ${event.detail}`));
setUpPlayground(() => {});

function start() {
  takeTokenFromLink();
  if (currentToken()) {
    api("/tpm/v1/whoami").then(enter, (error) => leave(error.message));
  } else {
    leave("");
  }
}

// A sign-in link opened in a tab already showing the page changes only the fragment: no reload.
window.addEventListener("hashchange", () => {
  if (new URLSearchParams(location.hash.slice(1)).has("token")) start();
});
start();
