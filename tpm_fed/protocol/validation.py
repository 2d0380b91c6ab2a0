"""Check a trace request against the model's points before it goes anywhere.

Everything that needs only the model's architecture is checked here, on
the client: points, heads, layers, the shape of every given tensor. Token
positions depend on tokenization and are checked on the replica, before
its forward pass (still at no charge).
"""

from __future__ import annotations

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.points import PointCatalog
from tpm_fed.protocol.requests import TraceRequest
from tpm_fed.protocol.limits import MAX_RESULT_BYTES
from tpm_fed.protocol.requests import SPECIAL_TOKENS_ALLOWANCE, UsageBound

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check_trace(request: TraceRequest, points: PointCatalog, dtype: str) -> UsageBound:
    """Validate ``request`` for a model with these points; return what it may use at most.

    Raises:
        UnknownPoint: A point, or a head, the model does not have (closest names suggested).
        InvalidRequest: A layer out of range, a tensor of the wrong shape, an injection
            at a point that is not the hidden size.
    """
    for index, step in enumerate(request.steps):
        features = points.features(step.address)
        where = f"step {index} ({step.op} at {step.point})"
        if step.op in ("set", "add"):
            shape = tuple(step.value.shape)
            per_position = len(step.positions) if step.positions else None
            if shape != features and not (per_position and shape == (per_position, *features)):
                rows = f"[{per_position}, {', '.join(map(str, features))}]" if per_position else "[positions, ...]"
                raise InvalidRequest(f"{where}: value has shape {list(shape)}; expected {list(features)} or {rows}")
        if step.op == "inject" and features != (points.hidden_size,):
            raise InvalidRequest(f"{where}: memory injection needs a point of the hidden size "
                                 f"{points.hidden_size}; this one has {list(features)}")
    for hook in request.python_hooks:
        from tpm_fed.protocol.interventions import Point

        points.features(Point.parse(hook.point))
    for lens in (request.logit_lens, request.attention_lens, request.attention_patterns):
        for layer in (lens.layers or []) if lens is not None else []:
            points.layer(layer)
    if request.attention_lens is not None:
        for layer in request.attention_lens.layers or range(len(points.layers)):
            name, info = points.attention_of(layer)
            for head in request.attention_lens.heads or []:
                if not 0 <= head < info.heads:
                    raise InvalidRequest(f"attention_lens: head {head} is out of range; {name} has heads 0..{info.heads - 1}")
    bound = request.usage_bound()
    token_bounds = [len(p.encode()) + SPECIAL_TOKENS_ALLOWANCE for p in request.prompts]
    result_bound = request.result_bytes(points, token_bounds, DTYPE_BYTES[dtype])
    # The replica refuses anything over the limit, so no charge can exceed it.
    return UsageBound(bound.prompt_tokens, bound.completion_tokens, min(result_bound, MAX_RESULT_BYTES))

