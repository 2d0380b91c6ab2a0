"""Run a :class:`~tpm_fed.protocol.sessions.SessionRequest`: its steps in order on this replica.

Every step is tokenized and checked (as a trace, and each ``value_from``
against what it names) before the first one runs, with the same function the
client used (:func:`tpm_fed.protocol.validation.check_session`), so a bad
step refuses the whole session with nothing run. What a step saves stays here
as torch tensors for later steps; all steps' tensors leave in one blob.
"""

from __future__ import annotations

from typing import Any

from functions.interventions.tracer import Tracer
from functions.policy import WorkerPolicy
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.sessions import SessionRequest
from tpm_fed.protocol.validation import check_session


def run_session(tracer: Tracer, session: SessionRequest, *, policy: WorkerPolicy) -> tuple[dict[str, Any], dict]:
    """The session's tensors (``STEP/PROMPT:NAME`` -> torch) and the rest of its reply (``steps``, ``usage``).

    Raises:
        InvalidRequest, UnknownPoint, ContextLengthExceeded: A step does not fit this model, or the
            session has more steps than this endpoint runs (nothing ran).
        PayloadTooLarge: All steps' tensors together would be over what this endpoint returns.
    """
    if len(session.steps) > policy.max_session_steps:
        raise InvalidRequest(f"the session has {len(session.steps)} steps; this endpoint runs at most "
                             f"{policy.max_session_steps} in one session (split it)")
    traces = session.traces()
    prompt_ids = [tracer.tokenize(trace) for trace in traces]
    lengths = [[len(ids) for ids in step_ids] for step_ids in prompt_ids]
    dtype = str(tracer.model.dtype).removeprefix("torch.")
    check_session(session, tracer.catalog, dtype, lengths)
    tracer.check_size(sum(trace.result_bytes(tracer.catalog, step_lengths, tracer.item_bytes)
                          for trace, step_lengths in zip(traces, lengths, strict=True)), policy)

    kept: dict[str, Any] = {}  # STEP/PROMPT:NAME -> what that step saved

    def value(value_from) -> Any:
        terms = value_from.terms
        total = kept[f"{terms[0].step}/{terms[0].prompt}:{terms[0].save}"].float() * terms[0].weight
        for term in terms[1:]:
            total = total + kept[f"{term.step}/{term.prompt}:{term.save}"].float() * term.weight
        return total

    steps, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "activation_bytes": 0}
    for step, trace, ids in zip(session.steps, traces, prompt_ids, strict=True):
        tensors, reply = tracer.execute(trace, ids, policy=policy, values=value)
        kept.update({f"{step.name}/{name}": tensor for name, tensor in tensors.items()})
        steps.append({"name": step.name, **reply})
        for field in usage:
            usage[field] += reply["usage"][field]
    return kept, {"steps": steps, "usage": usage}
