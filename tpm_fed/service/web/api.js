// The service's HTTP API, called with the signed-in caller's bearer token.
//
// The token lives in sessionStorage: it is this tab's only, and gone when
// the tab closes. No data call is made without one.

import { readEvents } from "./sse.js";

const TOKEN_KEY = "tpm-token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/**
 * Sign in from a link such as `http://127.0.0.1:PORT/#token=...` (what `tpm serve`
 * prints, as Jupyter does). A fragment is never sent to the server, so the token
 * stays out of its logs; it is then removed from the address bar and history.
 */
export function takeTokenFromLink() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

export const currentToken = () => sessionStorage.getItem(TOKEN_KEY);
export const rememberToken = (token) => sessionStorage.setItem(TOKEN_KEY, token);
export const forgetToken = () => sessionStorage.removeItem(TOKEN_KEY);

/** GET (or POST `body`) a JSON route. */
export async function api(path, body) {
  const response = await send(path, body);
  return response.json();
}

/** POST `body` to a streaming route and yield each event's JSON as it arrives. */
export async function* stream(path, body) {
  const response = await send(path, body);
  yield* readEvents(response.body);
}

/** How to log in to this service: public, holds no secret (`GET /tpm/v1/auth`). */
export async function loginInfo() {
  const response = await fetch("/tpm/v1/auth");
  return response.ok ? response.json() : {};
}

async function send(path, body) {
  const token = currentToken();
  if (!token) throw new ApiError(401, "not signed in");
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.ok) return response;
  const message = await errorMessage(response);
  if (response.status === 401) {
    // The token was refused (wrong, revoked, or the service restarted with a new one).
    window.dispatchEvent(new CustomEvent("tpm-unauthenticated", { detail: message }));
  }
  throw new ApiError(response.status, message);
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message; // the service answers errors in OpenAI's shape
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}
