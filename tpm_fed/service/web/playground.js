// The playground: one completion, or one chat turn, streamed. The answer
// grows as chunks arrive (POST /v1/completions or /v1/chat/completions with
// `stream: true`); the last chunk carries the usage and the `tpm` object
// (charge, exact version, where it ran). Chat formats the message with the
// model's own chat template; a model without one is refused with a clear error.

import { ApiError, stream } from "./api.js";
import { el, formatSeconds, formatSu, showError } from "./dom.js";

const $ = (id) => document.getElementById(id);

/** Offer the models that generate text (mode 1). */
export function offerModels(cards) {
  const select = $("pg-model");
  const chosen = select.value;
  const usable = cards.filter((card) => (card.tpm?.kinds ?? ["generate"]).includes("generate") && !card.tpm?.problem);
  select.replaceChildren(...usable.map((card) => el("option", { value: card.id }, card.id)));
  if (usable.some((card) => card.id === chosen)) select.value = chosen;
}

/** What each mode sends, and where the text is in its chunks. */
const MODES = {
  completion: {
    route: "/v1/completions",
    ask: (text) => ({ prompt: text }),
    text: (choice) => choice.text ?? "",
  },
  chat: {
    route: "/v1/chat/completions",
    ask: (text) => ({ messages: [{ role: "user", content: text }] }),
    text: (choice) => choice.delta?.content ?? "",
  },
};

export function setUpPlayground(onAnswered) {
  $("pg-mode").onchange = () => {
    $("pg-prompt-label").textContent = $("pg-mode").value === "chat" ? "Message" : "Prompt";
  };
  $("playground-form").onsubmit = async (event) => {
    event.preventDefault();
    const send = $("pg-send");
    send.disabled = true;
    try {
      await complete();
      onAnswered();
    } catch (error) {
      showError($("pg-error"), error);
      $("pg-state").textContent = "failed";
    } finally {
      send.disabled = false;
    }
  };
}

async function complete() {
  const answer = $("pg-answer");
  answer.textContent = "";
  answer.dataset.state = "waiting";
  $("pg-receipt").hidden = true;
  showError($("pg-error"), null);
  $("pg-state").textContent = "waiting for a replica…";
  const mode = MODES[$("pg-mode").value];
  const body = {
    model: $("pg-model").value,
    ...mode.ask($("pg-prompt").value),
    max_tokens: Number($("pg-max-tokens").value),
    temperature: Number($("pg-temperature").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  let last = null;
  for await (const chunk of stream(mode.route, body)) {
    if (chunk.error) throw new ApiError(500, chunk.error.message ?? "the stream failed");
    for (const choice of chunk.choices ?? []) {
      answer.dataset.state = "streaming";
      $("pg-state").textContent = "streaming…";
      answer.append(mode.text(choice));
    }
    if (chunk.usage) last = chunk;
  }
  answer.dataset.state = "done";
  $("pg-state").textContent = "done";
  if (last) showReceipt(last);
}

function showReceipt({ usage, tpm }) {
  $("pg-request-id").textContent = tpm?.request_id ?? "—";
  $("pg-usage").textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`;
  const charge = tpm?.charge;
  $("pg-charge").textContent = charge
    ? `${formatSu(charge.charged_su)} SU to ${charge.project}${charge.free ? " (own site: free)" : ""}`
    : "—";
  $("pg-charge").dataset.su = charge ? formatSu(charge.charged_su) : "";
  $("pg-version").textContent = tpm?.version ?? "—";
  $("pg-where").textContent = tpm
    ? `${tpm.site}, replica ${tpm.replica} (${tpm.backend}, `
      + `${tpm.warm ? "warm" : `cold start, loaded in ${formatSeconds(tpm.load_s)}`})`
    : "—";
  $("pg-receipt").hidden = false;
}
