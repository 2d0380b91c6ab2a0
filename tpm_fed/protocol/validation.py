"""The checks both sides run: one function each, so client and worker refuse alike.

A trace spec is checked against a model's point catalog by
:func:`check_spec`: on the client against the catalog probed from
``config.json`` on the ``meta`` device (:func:`check_trace`, before anything
is sent or reserved), and on the worker against the loaded model's own
catalog (before its forward pass). Only the worker resolves token
positions, which depend on tokenization. :func:`check_context` is the
context-length check: on the client before tokenizing, on the worker after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tpm_fed.protocol.dtypes import ITEM_BYTES
from tpm_fed.protocol.errors import ContextLengthExceeded, InvalidRequest
from tpm_fed.protocol.interventions import Point
from tpm_fed.protocol.references import MAX_REFERENCE_BYTES
from tpm_fed.protocol.points import PointCatalog
from tpm_fed.protocol.requests import SPECIAL_TOKENS_ALLOWANCE, TraceRequest, UsageBound

ValueShape = Callable[..., "tuple | None"]
"""``(value_from, where) -> shape or None``: what a session's saved values make (see :func:`check_session`)."""


def check_spec(request: TraceRequest, points: PointCatalog, value_shape: ValueShape | None = None,
               prompt_tokens: Sequence[int] | None = None) -> None:
    """Check everything in ``request`` that depends only on the model's architecture.

    Points and heads exist; ``set``/``add`` values are one position's features,
    or one row per named position; an injection acts at a point of the hidden
    size; python hooks name real points; lens layers and heads are in range.

    Args:
        value_shape: In a session, the shape of a ``value_from`` (None while it
            awaits tokenizing); outside one, ``value_from`` is refused.
        prompt_tokens: Each prompt's token count, once known: a value taken from
            an earlier step may then be one row per token of a step without positions.

    Raises:
        UnknownPoint: A point, or a head, the model does not have (closest names suggested).
        InvalidRequest: A layer or head out of range, a value of the wrong shape, an
            injection at a point that is not the hidden size.
    """
    for index, step in enumerate(request.steps):
        features = points.features(step.address)
        where = step_label(index, step)
        if step.op in ("set", "add"):
            per_position = len(step.positions) if step.positions else None
            if step.value_from is None:
                shape = tuple(step.value.shape)
            elif value_shape is None:
                raise InvalidRequest(f"{where}: value_from takes values saved by earlier steps of a session; "
                                     "send this trace as a step of a session")
            else:
                shape = value_shape(step.value_from, where)
                if shape is None or (per_position is None and prompt_tokens is None and len(shape) > len(features)):
                    continue  # rows known only once the prompts are tokenized: the worker checks
                if per_position is None and prompt_tokens is not None:
                    targets = step.prompts or range(len(prompt_tokens))
                    if len({prompt_tokens[p] for p in targets}) == 1:
                        per_position = prompt_tokens[next(iter(targets))]
            if shape != features and not (per_position and shape == (per_position, *features)):
                rows = f"[{per_position}, {', '.join(map(str, features))}]" if per_position else "[positions, ...]"
                raise InvalidRequest(f"{where}: value has shape {list(shape)}; expected {list(features)} or {rows}")
            if step.generated and shape != features:  # a generated token is one position
                raise InvalidRequest(f"{where}: a value with a row per position cannot also edit generated tokens; "
                                     f"give one position's features {list(features)}, or generated=false")
        if step.op == "save" and step.reduce is not None:
            check_reduce(where, step.reduce, features)
        if step.op == "inject" and features != (points.hidden_size,):
            raise InvalidRequest(f"{where}: memory injection needs a point of the hidden size "
                                 f"{points.hidden_size}; this one has {list(features)}")
    for hook in request.python_hooks:
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


def check_reduce(where: str, reduce, features: tuple[int, ...]) -> None:
    """A reduction names an axis the saved tensor has; projection vectors match its features."""
    if reduce.axis == "heads" and len(features) != 2:
        raise InvalidRequest(f"{where}: there is no heads axis to reduce over here; "
                             f"only a heads[*] point has one (this one is [positions, {features[0]}])")
    if reduce.op == "project" and reduce.vectors.shape[1] != features[-1]:
        raise InvalidRequest(f"{where}: projection vectors have {reduce.vectors.shape[1]} features; "
                             f"the point has {features[-1]}")


def step_label(index: int, step) -> str:
    """How messages name a step: ``step 2 (add at model.layers.1.output)``."""
    return f"step {index} ({step.op} at {step.point})"


def check_trace(request: TraceRequest, points: PointCatalog, dtype: str) -> UsageBound:
    """Validate ``request`` for a model with these points (on the client); return what it may use at most.

    Raises:
        UnknownPoint, InvalidRequest: As :func:`check_spec`.
    """
    check_spec(request, points)
    bound = request.usage_bound()
    token_bounds = [len(p.encode()) + SPECIAL_TOKENS_ALLOWANCE for p in request.prompts]
    result_bound = request.result_bytes(points, token_bounds, ITEM_BYTES[dtype])
    # The replica refuses anything over its limit (by reference at most), so no charge can exceed it.
    return UsageBound(bound.prompt_tokens, bound.completion_tokens, min(result_bound, MAX_REFERENCE_BYTES))


def check_session(session, points: PointCatalog, dtype: str,
                  prompt_tokens: list[list[int]] | None = None) -> UsageBound:
    """Validate a session for a model with these points; return what it may use at most.

    Every step is checked as a trace (:func:`check_spec`), and every ``value_from``
    against what the steps it names save: terms of one shape, which fits where it
    is written. On the client row counts that depend on tokenizing are left to the
    worker, which calls this again with ``prompt_tokens`` (per step, per prompt)
    before any step runs.

    Raises:
        UnknownPoint, InvalidRequest: As :func:`check_spec`, naming the step.
    """
    from tpm_fed.protocol.sessions import saved_shape

    names = [step.name for step in session.steps]
    bound, result_bytes = session.usage_bound(), 0
    for index, (step, trace) in enumerate(zip(session.steps, session.traces(), strict=True)):

        def value_shape(value_from, where: str) -> tuple | None:
            shapes = []
            for term in value_from.terms:
                earlier = session.steps[names.index(term.step)]
                save = earlier.saves()[term.save]
                tokens = prompt_tokens[names.index(term.step)][term.prompt] if prompt_tokens else None
                shapes.append(saved_shape(earlier, save, points.features(save.address), tokens))
            if any(None in shape for shape in shapes):
                return None
            if len(set(shapes)) > 1:
                listed = ", ".join(f"{t.step}.{t.save}[{t.prompt}] {list(s)}" for t, s in zip(value_from.terms, shapes))
                raise InvalidRequest(f"{where}: value_from adds tensors of different shapes: {listed}")
            return shapes[0]

        try:
            check_spec(trace, points, value_shape, prompt_tokens[index] if prompt_tokens else None)
        except InvalidRequest as error:
            raise type(error)(f"session step {step.name!r}: {error}") from None
        token_bounds = [len(p.encode()) + SPECIAL_TOKENS_ALLOWANCE for p in step.prompts]
        result_bytes += trace.result_bytes(points, token_bounds, ITEM_BYTES[dtype])
    return UsageBound(bound.prompt_tokens, bound.completion_tokens, min(result_bytes, MAX_REFERENCE_BYTES))


def check_context(
    max_new_tokens: int, context_length: int, prompt_tokens: Sequence[int] | None = None, model: str | None = None
) -> None:
    """Refuse a request whose prompts plus ``max_new_tokens`` cannot fit in the model's context.

    Args:
        max_new_tokens: Tokens the request may generate per prompt.
        context_length: The model's context (0: unknown, nothing is refused).
        prompt_tokens: Each prompt's token count, once tokenized (on the worker). Before
            tokenizing (on the client) leave it out: a prompt counts as at least one token.
        model: The model's name, for the message.

    Raises:
        ContextLengthExceeded: It cannot fit.
    """
    if not context_length:
        return
    of_model = f" of model {model!r}" if model else ""
    if prompt_tokens is None:
        if max_new_tokens >= context_length:
            raise ContextLengthExceeded(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                                        f"the context of {context_length} tokens{of_model}")
        return
    for index, count in enumerate(prompt_tokens):
        if count + max_new_tokens > context_length:
            raise ContextLengthExceeded(
                f"prompt {index} has {count} tokens; with max_new_tokens={max_new_tokens} "
                f"that exceeds the model's context of {context_length} tokens"
            )
