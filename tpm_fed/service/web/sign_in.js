// Signing in: "Log in with Globus" (a shared service: the service runs the
// login and sends the browser back with its token in the fragment), or paste a
// token; either is checked with `GET /tpm/v1/whoami` before the page shows anything.

import { api, forgetToken, loginInfo, rememberToken } from "./api.js";
import { showError } from "./dom.js";

const section = () => document.getElementById("sign-in");

export function showSignIn(message, onSignedIn) {
  section().hidden = false;
  showError(document.getElementById("sign-in-error"), message);
  describeLogin();
  const form = document.getElementById("sign-in-form");
  form.onsubmit = async (event) => {
    event.preventDefault();
    const input = document.getElementById("token-input");
    rememberToken(input.value.trim());
    try {
      const me = await api("/tpm/v1/whoami");
      input.value = "";
      section().hidden = true;
      onSignedIn(me);
    } catch (error) {
      forgetToken();
      showError(document.getElementById("sign-in-error"), error);
    }
  };
}

export function hideSignIn() {
  section().hidden = true;
}

async function describeLogin() {
  const info = await loginInfo();
  const help = document.getElementById("login-help");
  document.getElementById("globus-login").hidden = info.mode !== "globus";
  if (info.mode === "globus") {
    help.textContent = `Or paste a Globus Auth access token for the scope ${info.scope} `
      + "(`tpm login` obtains one).";
  } else {
    help.textContent = "";
  }
}
