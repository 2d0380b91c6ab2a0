"""Answer embedding requests: every user's inputs through their input module, one core batch, their heads.

Requests with different adapters share the core's forward pass: each input
becomes a sequence of core embeddings (a text item, through the core's own
tokenizer and token embeddings), the sequences are right-padded into
one batch with an attention mask (a causal core never lets padding at the
end reach the positions before it), and each request's head reads its own
rows back. Which adapter registry is read, whether a caller's own
``input_code``/``head_code`` may run and how large a result may be are the
endpoint's policy (:mod:`functions.policy`), never the request's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from functions.adapters.loader import ADAPTERS
from functions.backends.base import HiddenStates
from functions.outcomes import refused
from functions.policy import WorkerPolicy
from tpm_fed.protocol.errors import AdapterMismatch, InvalidRequest, TpmError
from tpm_fed.protocol.requests import EmbeddingRequest
from tpm_fed.protocol.validation import check_context


@dataclass
class _Prepared:
    request: EmbeddingRequest
    sequences: list[Any]  # one [tokens, hidden] tensor per input
    head: Any


def run_embeddings(core: HiddenStates, requests: list[EmbeddingRequest], *, policy: WorkerPolicy) -> list[dict[str, Any]]:
    """One outcome per request: ``{"result": {...}}`` or ``{"error": {...}}``.

    Args:
        core: A backend exposing the core model (its ``model``, ``tokenizer`` and context).
        requests: Embedding requests, answered in one core batch.
        policy: This endpoint's policy (caller code, adapter registry, result size).
    """
    import torch

    outcomes: list[dict[str, Any] | None] = [None] * len(requests)
    prepared: list[tuple[int, _Prepared]] = []
    with torch.no_grad():
        for index, request in enumerate(requests):
            try:
                prepared.append((index, _prepare(core, request, policy)))
            except TpmError as error:
                outcomes[index] = refused(error)
        if prepared:
            states = _core(core.model, [s for _, p in prepared for s in p.sequences])
            cursor = 0
            for index, item in prepared:
                count = len(item.sequences)
                try:
                    outcomes[index] = _finish(item, states[cursor:cursor + count], policy)
                except TpmError as error:
                    outcomes[index] = refused(error)
                cursor += count
    return outcomes  # type: ignore[return-value]


def _prepare(core: HiddenStates, request: EmbeddingRequest, policy: WorkerPolicy) -> _Prepared:
    if request.runs_user_code:  # first, so a refused request's code is never unpacked
        policy.check_caller_code("input_code and head_code")
    model = core.model
    hidden = int(model.config.hidden_size)
    head, head_in = _module(request.head, request.head_code, policy, model.dtype)
    if head_in is not None and head_in != hidden:
        raise AdapterMismatch(f"head {request.head!r} takes {head_in} features; the core's hidden size is {hidden}")
    if request.texts:
        sequences = _text_sequences(core, request.texts)
    else:
        sequences = _input_sequences(request, policy, model.dtype, hidden)
    check_context(0, core.context_length, [sequence.shape[0] for sequence in sequences])
    return _Prepared(request, sequences, head)


def _text_sequences(core: HiddenStates, texts: list[str]) -> list[Any]:
    """Each text through the core's own tokenizer and token embeddings."""
    import torch

    embeddings = core.model.get_input_embeddings()
    return [embeddings(torch.tensor(core.tokenizer(text)["input_ids"], device=core.model.device)) for text in texts]


def _input_sequences(request: EmbeddingRequest, policy: WorkerPolicy, dtype, hidden: int) -> list[Any]:
    """Each of the caller's tensors through their input module, as ``[tokens, hidden]``."""
    import torch

    input_module, in_features = _module(request.input_module, request.input_code, policy, dtype)
    sequences = []
    for index, tensor in enumerate(request.inputs):
        x = tensor.torch().to(dtype)
        if in_features is not None and x.shape[-1] != in_features:
            raise InvalidRequest(f"input {index} has {x.shape[-1]} features; "
                                 f"input module {request.input_module!r} takes {in_features}")
        embedded = input_module(x)
        if not torch.is_tensor(embedded):
            raise InvalidRequest(f"the input module returned {type(embedded).__name__} for input {index}, not a tensor")
        if embedded.dim() == 1:
            embedded = embedded.unsqueeze(0)
        if embedded.dim() == 3 and x.dim() == 2:  # each row unflattened into tokens
            embedded = embedded.reshape(-1, embedded.shape[-1])
        if embedded.shape[-1] != hidden or embedded.dim() != 2:
            raise AdapterMismatch(f"input module gives embeddings of shape {list(embedded.shape)} for input {index}; "
                                  f"the core needs [tokens, {hidden}]")
        sequences.append(embedded.to(dtype))
    return sequences


def _module(ref: str | None, code: str | None, policy: WorkerPolicy, dtype):
    if code is not None:
        return policy.load_caller_code(code, "input_code and head_code"), None
    if ref is None:
        return None, None
    if policy.adapter_registry is None:
        raise InvalidRequest("this endpoint has no adapter registry (its operator names one with "
                             "TPM_ADAPTER_REGISTRY in the endpoint's worker_init)")
    module, record = ADAPTERS.get(policy.adapter_registry, ref, dtype)
    return module, record.architecture.in_features


def _core(model, sequences: list[Any]) -> list[Any]:
    """The core's final hidden states of each sequence, on the CPU: the caller's input modules and
    heads (small, and theirs) run on the CPU; only the shared core runs where the model lives."""
    import torch

    longest = max(s.shape[0] for s in sequences)
    hidden = sequences[0].shape[-1]
    embeds = torch.zeros(len(sequences), longest, hidden, dtype=sequences[0].dtype, device=model.device)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long, device=model.device)
    for row, sequence in enumerate(sequences):
        embeds[row, : sequence.shape[0]] = sequence
        mask[row, : sequence.shape[0]] = 1
    states = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.cpu()
    return [states[row, : sequence.shape[0]] for row, sequence in enumerate(sequences)]


def _finish(item: _Prepared, states: list[Any], policy: WorkerPolicy) -> dict[str, Any]:
    import torch

    from functions.references import deliver
    from tpm_fed.protocol.tensors import pack_tensors

    request = item.request
    outputs = {}
    for index, state in enumerate(states):
        if request.pool == "last":
            state = state[-1]
        elif request.pool == "mean":
            state = state.mean(dim=0)
        outputs[str(index)] = item.head(state) if item.head is not None else state
        if not torch.is_tensor(outputs[str(index)]):
            raise InvalidRequest(f"the head returned {type(outputs[str(index)]).__name__}, not a tensor")
    blob = pack_tensors(outputs)
    return {"result": {
        **deliver(blob, policy),
        "usage": {"prompt_tokens": sum(s.shape[0] for s in states), "completion_tokens": 0,
                  "activation_bytes": len(blob)},
    }}
