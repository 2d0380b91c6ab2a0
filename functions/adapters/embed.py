"""Answer embedding requests: every user's inputs through their input module, one core batch, their heads.

Requests with different adapters share the core's forward pass: each input
becomes a sequence of core embeddings, the sequences are right-padded into
one batch with an attention mask (a causal core never lets padding at the
end reach the positions before it), and each request's head reads its own
rows back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from functions.adapters.loader import ADAPTERS
from tpm_fed.protocol.requests import EmbeddingRequest
from tpm_fed.protocol.errors import AdapterMismatch, InvalidRequest, NotPermitted, PayloadTooLarge, TpmError
from tpm_fed.protocol.limits import MAX_RESULT_BYTES


@dataclass
class _Prepared:
    request: EmbeddingRequest
    sequences: list[Any]  # one [tokens, hidden] tensor per input
    head: Any


def run_embeddings(
    model: Any, requests: list[EmbeddingRequest], *, registry_root: str | None, allow_user_code: bool
) -> list[dict[str, Any]]:
    """One outcome per request: ``{"result": {...}}`` or ``{"error": {...}}``."""
    import torch

    outcomes: list[dict[str, Any] | None] = [None] * len(requests)
    prepared: list[tuple[int, _Prepared]] = []
    hidden = int(model.config.hidden_size)
    with torch.no_grad():
        for index, request in enumerate(requests):
            try:
                prepared.append((index, _prepare(model, request, hidden, registry_root, allow_user_code)))
            except TpmError as error:
                outcomes[index] = {"error": error.to_wire()}
        if prepared:
            states = _core(model, [s for _, p in prepared for s in p.sequences])
            cursor = 0
            for index, item in prepared:
                count = len(item.sequences)
                try:
                    outcomes[index] = _finish(item, states[cursor:cursor + count])
                except TpmError as error:
                    outcomes[index] = {"error": error.to_wire()}
                cursor += count
    return outcomes  # type: ignore[return-value]


def _prepare(model, request: EmbeddingRequest, hidden: int, registry_root, allow_user_code) -> _Prepared:

    if request.runs_user_code and not allow_user_code:
        raise NotPermitted("input_code and head_code run only on a site your project owns (byo); this site is shared")
    dtype = model.dtype
    input_module, in_features = _module(request.input_module, request.input_code, registry_root, dtype)
    head, head_in = _module(request.head, request.head_code, registry_root, dtype)
    if head_in is not None and head_in != hidden:
        raise AdapterMismatch(f"head {request.head!r} takes {head_in} features; the core's hidden size is {hidden}")
    sequences = []
    for index, tensor in enumerate(request.inputs):
        x = tensor.torch().to(dtype)
        if in_features is not None and x.shape[-1] != in_features:
            raise InvalidRequest(f"input {index} has {x.shape[-1]} features; "
                                 f"input module {request.input_module!r} takes {in_features}")
        embedded = input_module(x)
        if embedded.dim() == 1:
            embedded = embedded.unsqueeze(0)
        if embedded.dim() == 3 and x.dim() == 2:  # each row unflattened into tokens
            embedded = embedded.reshape(-1, embedded.shape[-1])
        if embedded.shape[-1] != hidden or embedded.dim() != 2:
            raise AdapterMismatch(f"input module gives embeddings of shape {list(embedded.shape)} for input {index}; "
                                  f"the core needs [tokens, {hidden}]")
        sequences.append(embedded.to(dtype))
    return _Prepared(request, sequences, head)


def _module(ref: str | None, code: str | None, registry_root: str | None, dtype):
    if code is not None:
        from globus_compute_sdk.serialize import ComputeSerializer

        return ComputeSerializer().deserialize(code), None
    if ref is None:
        return None, None
    if registry_root is None:
        raise InvalidRequest("this site has no adapter registry")
    module, record = ADAPTERS.get(registry_root, ref, dtype)
    return module, record.architecture.in_features


def _core(model, sequences: list[Any]) -> list[Any]:
    import torch

    longest = max(s.shape[0] for s in sequences)
    hidden = sequences[0].shape[-1]
    embeds = torch.zeros(len(sequences), longest, hidden, dtype=sequences[0].dtype)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        embeds[row, : sequence.shape[0]] = sequence
        mask[row, : sequence.shape[0]] = 1
    states = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return [states[row, : sequence.shape[0]] for row, sequence in enumerate(sequences)]


def _finish(item: _Prepared, states: list[Any]) -> dict[str, Any]:
    import torch

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
    if len(blob) > MAX_RESULT_BYTES:
        raise PayloadTooLarge(f"the result would be {len(blob):,} bytes; a result holds at most {MAX_RESULT_BYTES:,}")
    return {"result": {
        "tensors_blob": blob,
        "usage": {"prompt_tokens": sum(s.shape[0] for s in states), "completion_tokens": 0,
                  "activation_bytes": len(blob)},
    }}
