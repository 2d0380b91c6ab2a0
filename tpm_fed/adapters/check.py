"""Check an embedding request against the registry and the core before it goes anywhere."""

from __future__ import annotations

from tpm_fed.storage.adapter_registry import AdapterRegistry
from tpm_fed.protocol.requests import EmbeddingRequest
from tpm_fed.protocol.errors import AdapterMismatch, InvalidRequest
from tpm_fed.protocol.references import MAX_REFERENCE_BYTES
from tpm_fed.protocol.requests import UsageBound
from tpm_fed.protocol.tensors import TENSOR_HEADER_BYTES


def pin_adapters(request: EmbeddingRequest, registry: AdapterRegistry, hidden_size: int) -> tuple[EmbeddingRequest, UsageBound]:
    """Pin the request's adapters to exact versions and check they fit the core and the inputs.

    Raises:
        UnknownAdapter: An adapter name or version is not registered.
        AdapterMismatch: The input module does not make ``hidden_size`` wide embeddings,
            or the head does not take them.
        InvalidRequest: An input's width is not what the input module takes.
    """
    updates: dict[str, str] = {}
    tokens_per_row = 1
    if request.input_module is not None:
        record = registry.resolve(request.input_module)
        architecture = record.architecture
        if architecture.out_features != hidden_size:
            raise AdapterMismatch(f"input module {record.ref} makes {architecture.out_features}-wide embeddings; "
                                  f"the core's hidden size is {hidden_size}")
        for index, tensor in enumerate(request.inputs):
            if tensor.shape[-1] != architecture.in_features:
                raise InvalidRequest(f"input {index} has {tensor.shape[-1]} features; "
                                     f"input module {record.ref} takes {architecture.in_features}")
        if architecture.makes_sequence:
            tokens_per_row = next(layer.tokens for layer in architecture.layers if layer.type == "unflatten")
        updates["input_module"] = record.ref
    output_width = hidden_size
    if request.head is not None:
        record = registry.resolve(request.head)
        if record.architecture.in_features != hidden_size:
            raise AdapterMismatch(f"head {record.ref} takes {record.architecture.in_features} features; "
                                  f"the core's hidden size is {hidden_size}")
        output_width = record.architecture.out_features
        updates["head"] = record.ref
    pinned = request.model_copy(update=updates)
    bound = pinned.usage_bound(tokens_per_row)
    result = bound.prompt_tokens * output_width * 4 + TENSOR_HEADER_BYTES * request.item_count
    return pinned, UsageBound(bound.prompt_tokens, 0, min(result, MAX_REFERENCE_BYTES))
