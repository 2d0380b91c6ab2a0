// The sign-in form: paste a token; it is checked with `GET /tpm/v1/whoami`
// before the page shows anything.

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
  if (info.mode === "globus") {
    help.textContent = `This service takes Globus Auth access tokens for the scope ${info.scope}: `
      + "log in with `tpm login`, then paste an access token for that scope.";
  } else {
    help.textContent = "";
  }
}
