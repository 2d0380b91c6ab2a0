"""Sessions: several traces on one replica, where a later step uses what an earlier one saved.

Interpretability work is often a chain: read activations for two prompts,
make a steering vector of their difference, generate with it added. As
separate requests each step waits in the queue, is placed, and ships its
tensors home and back. A session is one request: one queue wait, one
placement, one replica; the values stay on the replica between steps (a
``set`` or ``add`` step names them with ``value_from``). Each step's usage is
reported on its own line of the result; the session is charged once, for the
sum. A bad step refuses the whole session before any step runs.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tpm_fed.protocol.interventions import AttentionLens, AttentionPatterns, LogitLens, Save, Step
from tpm_fed.protocol.requests import ServingRequest, TraceRequest, UsageBound, check_prompts

MAX_SESSION_STEPS = 16
"""The most steps one session may hold (a site may not keep more values for one caller)."""


class SessionStep(BaseModel):
    """One trace of a session: :class:`~tpm_fed.protocol.requests.TraceRequest`'s fields, and a name.

    Attributes:
        name: How later steps name this step's saves (``value_from``) and how results key them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=r"^[\w-]{1,64}$")
    prompts: list[str] = Field(min_length=1)
    steps: list[Step] = Field(default_factory=list)
    logit_lens: LogitLens | None = None
    attention_lens: AttentionLens | None = None
    attention_patterns: AttentionPatterns | None = None
    max_new_tokens: int = Field(default=0, ge=0)

    _prompts_not_empty = field_validator("prompts")(classmethod(lambda cls, prompts: check_prompts(prompts)))

    def trace(self, session: SessionRequest) -> TraceRequest:
        """This step as a trace of the session's model (what the replica runs)."""
        fields = self.model_dump(exclude={"name"})
        return TraceRequest.model_validate({**fields, "model": session.model, "request_id": session.request_id})

    def saves(self) -> dict[str, Save]:
        return {step.key: step for step in self.steps if isinstance(step, Save)}


class SessionRequest(ServingRequest):
    """Steps run in order on one replica (see the module doc).

    Attributes:
        steps: Traces, each named; a ``set``/``add`` in one may take its value
            from the saves of earlier ones (``value_from``).
    """

    kind: Literal["session"] = "session"
    steps: list[SessionStep] = Field(min_length=1, max_length=MAX_SESSION_STEPS)

    @model_validator(mode="after")
    def _names_and_references(self) -> Self:
        seen: dict[str, SessionStep] = {}
        for step in self.steps:
            if step.name in seen:
                raise ValueError(f"steps: two steps are named {step.name!r}; give each a distinct name")
            trace = step.trace(self)  # the trace's own checks (prompt indexes, distinct save names)
            for inner, edit in enumerate(trace.steps):
                for term in (edit.value_from.terms if getattr(edit, "value_from", None) else []):
                    where = f"step {step.name!r}, {edit.op} {inner}: value_from"
                    earlier = seen.get(term.step)
                    if earlier is None:
                        raise ValueError(f"{where} names step {term.step!r}, which is not an earlier step of "
                                         f"this session (earlier: {', '.join(seen) or 'none'})")
                    save = earlier.saves().get(term.save)
                    if save is None:
                        raise ValueError(f"{where}: step {term.step!r} saves no {term.save!r} "
                                         f"(it saves: {', '.join(earlier.saves()) or 'nothing'})")
                    if term.prompt >= len(earlier.prompts) or (save.prompts and term.prompt not in save.prompts):
                        raise ValueError(f"{where}: {term.step}.{term.save} keeps nothing for prompt {term.prompt}")
            seen[step.name] = step
        return self

    @property
    def item_count(self) -> int:
        return sum(len(step.prompts) for step in self.steps)

    def traces(self) -> list[TraceRequest]:
        return [step.trace(self) for step in self.steps]

    def usage_bound(self) -> UsageBound:
        bounds = [trace.usage_bound() for trace in self.traces()]
        return UsageBound(sum(b.prompt_tokens for b in bounds), sum(b.completion_tokens for b in bounds))


def saved_shape(step: SessionStep, save: Save, features: tuple[int, ...], prompt_tokens: int | None) -> tuple:
    """The shape of what ``save`` keeps for one prompt; its first size is None while the rows await tokenizing."""
    if save.reduce is not None and save.reduce.axis == "positions":
        return save.reduce.shape((1, *features))
    rows = len(save.positions) if save.positions else prompt_tokens
    if rows is not None and save.generated:
        rows += step.max_new_tokens
    shape = (rows, *features)
    return shape if save.reduce is None else save.reduce.shape(shape)
