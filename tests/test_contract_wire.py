"""The contract's wire bodies, read by one end as the other wrote them.

- An HTTP error body (:mod:`tpm_fed.protocol.http_errors`) rebuilds, in the client, the error the service raised.
- A task's reply (:mod:`tpm_fed.protocol.task_reply`) written by the worker's ``serve_batch`` is read back by
  :func:`reply_from_wire`; a malformed item fails its own request only, an unmatched reply fails whole.
- The back channel's frames (:mod:`tpm_fed.protocol.back_channel`) refuse what neither end writes.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tpm_fed.protocol import errors
from tpm_fed.protocol.back_channel import (
    SERVICE_FRAMES,
    WORKER_FRAMES,
    Cancelled,
    EarlyAnswer,
    Hello,
    Joined,
    JoinsEnded,
    Sent,
    Settled,
    TakeNoMore,
)
from tpm_fed.protocol.http_errors import _STATUS, error_from_body, http_error
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import ReplicaInfo
from tpm_fed.protocol.task_reply import (
    MalformedOutcome,
    MalformedReply,
    Outcome,
    TaskReply,
    reply_from_wire,
)


@pytest.mark.parametrize("cls", [cls for cls, _, _ in _STATUS])
def test_an_http_error_body_rebuilds_the_error_the_service_raised(cls):
    try:
        error = cls("what went wrong")
    except TypeError:  # an error built from more than a message travels as its base type's
        pytest.skip(f"{cls.__name__} is not built from a message alone")
    answer = http_error(error)
    rebuilt = error_from_body(answer.status, answer.body())
    assert type(rebuilt) is type(error) and str(rebuilt) == "what went wrong"
    assert answer.status >= 400 and set(answer.body()["error"]) == {"message", "type", "param", "code"}


def test_a_body_that_is_not_an_error_body_is_a_remote_error_not_a_crash():
    assert isinstance(error_from_body(502, "<html>bad gateway</html>"), errors.RemoteExecutionError)
    assert isinstance(error_from_body(500, {"error": "flat"}), errors.RemoteExecutionError)


def test_an_unforeseen_error_is_a_500_naming_its_type():
    answer = http_error(KeyError("x"))
    assert answer.status == 500 and answer.code == "KeyError"


def _generate_reply(count: int) -> dict:
    return TaskReply(
        backend="torch", load_s=0.5, run_s=0.25, notes=["n"],
        replica=ReplicaInfo(replica_id="r", host="h", pid=1, warm=False, batch_size=count),
        outcomes=[{"result": {"completions": [{"text": "ok", "token_ids": [1], "finish_reason": "length"}],
                              "usage": {"prompt_tokens": 1, "completion_tokens": 1}}}] * count,
    ).to_wire()


def test_a_reply_reads_back_as_written_and_its_results_validate_as_their_kind():
    reply = reply_from_wire(_generate_reply(2), requests=2)
    assert reply.replica.batch_size == 2 and reply.load_s == 0.5 and reply.notes == ["n"]
    for outcome in reply.outcomes:
        assert isinstance(outcome, Outcome) and outcome.raised() is None
        result = KINDS["generate"].result.model_validate({
            **outcome.result, "request_id": "a", "model": "m", "version": "v", "backend": reply.backend,
            "site": "s", "replica": reply.replica, "timings": {"queue_s": 0, "load_s": 0, "run_s": 0}})
        assert result.texts == ["ok"]


@pytest.mark.parametrize("spoil,problem", [
    (lambda r: r["outcomes"].__setitem__(1, "not an outcome"), "outcome"),
    (lambda r: r["outcomes"].__setitem__(1, {"error": ["not", "an", "error"]}), "error"),
    (lambda r: r["outcomes"].__setitem__(1, {"result": {}, "error": {"type": "X", "message": "m"}}), "one of them"),
    (lambda r: r["outcomes"].__setitem__(1, {"neither": 1}), "neither"),
])
def test_a_malformed_outcome_fails_its_own_request_only(spoil, problem):
    wire = _generate_reply(3)
    spoil(wire)
    reply = reply_from_wire(wire, requests=3)
    assert [type(o) for o in reply.outcomes] == [Outcome, MalformedOutcome, Outcome]
    assert problem in reply.outcomes[1].problem
    assert isinstance(reply.outcomes[1].raised(), errors.RemoteExecutionError)


@pytest.mark.parametrize("spoil", [
    lambda r: r["outcomes"].pop(),
    lambda r: r.__setitem__("outcomes", {"0": {}}),
    lambda r: r.clear(),
    lambda r: r.__setitem__("load_s", "slow"),
])
def test_a_reply_whose_answers_cannot_be_matched_is_refused_whole(spoil):
    wire = _generate_reply(3)
    spoil(wire)
    with pytest.raises(MalformedReply):
        reply_from_wire(wire, requests=3)


def test_a_refused_outcome_carries_its_type():
    outcome = Outcome.refused(errors.ContextLengthExceeded("too long"))
    assert outcome.to_wire() == {"error": {"type": "ContextLengthExceeded", "message": "too long"}}
    assert isinstance(outcome.raised(), errors.ContextLengthExceeded)


def test_the_worker_writes_the_contracts_reply(demo_model_dir):
    """``serve_batch`` on a real replica: its wire form is a TaskReply, and the refusal of a batch refused whole
    keeps ``replica`` None (errors only)."""
    from functions.serve import serve_batch
    from tpm_fed.protocol.versions import hash_model_dir

    spec = {"name": "demo", "version": hash_model_dir(demo_model_dir), "path": str(demo_model_dir),
            "backend": "torch"}
    requests = [GenerationRequest.create("The cell", "demo", max_new_tokens=2).to_wire(),
                {"kind": "generate", "prompts": []}]
    reply = reply_from_wire(serve_batch(spec, requests), requests=2)
    assert isinstance(reply.outcomes[0], Outcome) and reply.outcomes[0].result["usage"]["completion_tokens"] == 2
    assert isinstance(reply.outcomes[1].raised(), errors.InvalidRequest)
    assert reply.replica is not None and reply.replica.batch_size == 1  # the one answered
    refused = serve_batch(spec | {"version": "0" * 16}, requests[:1])
    assert refused["replica"] is None and "error" in refused["outcomes"][0]
    assert reply_from_wire(refused, requests=1).outcomes[0].raised() is not None


def test_back_channel_frames_refuse_what_neither_end_writes():
    sent = Sent(chunks=[{"request_id": "a", "index": 0, "text": "x"}],
                outcomes=[EarlyAnswer(request_id="a", outcome=Outcome(result={"usage": {}}, run_s=0.1))])
    assert WORKER_FRAMES.validate_json(sent.to_frame()) == sent
    for frame in (Hello(token="t"), TakeNoMore()):
        assert WORKER_FRAMES.validate_json(frame.to_frame()) == frame
    for frame in (Joined(requests=[{"request_id": "r"}]), Cancelled(request_ids=["r"]), Settled(request_ids=["r"]),
                  JoinsEnded()):
        assert SERVICE_FRAMES.validate_json(frame.to_frame()) == frame
    for bad in ({**sent.to_wire(), "extra": 1}, {"type": "hello", "token": ""}, {"type": "joined", "requests": []},
                {"chunks": []},  # no type: neither end writes one
                {**sent.to_wire(), "outcomes": [{"request_id": "a", "outcome": {"result": {}, "error": None,
                                                                                "run_s": -1}}]}):
        with pytest.raises(ValidationError):
            WORKER_FRAMES.validate_python(bad)
    with pytest.raises(ValidationError):  # a worker frame is not one the service sends, nor the reverse
        SERVICE_FRAMES.validate_json(Hello(token="t").to_frame())
