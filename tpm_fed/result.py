"""Results: what came back, from which exact model version, and what it used."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)


class Completion(_Record):
    """The answer to one prompt.

    Attributes:
        text: Generated text, without the prompt and without a matched stop string.
        token_ids: Generated token ids (up to and including the one that
            completed a stop string; no end-of-sequence token).
        finish_reason: ``"length"`` (hit max_new_tokens), ``"eos"`` (the model
            ended) or ``"stop"`` (a stop string matched).
    """

    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "eos", "stop"]


class Usage(_Record):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(_Record):
    """Seconds spent, as seen by the caller.

    Attributes:
        queue_s: Everything that was neither loading nor running: waiting for
            a worker, serialization, the trip to the site and back.
        load_s: Loading the model into the replica (0 on a warm replica).
        run_s: The backend's work on the batch this request rode in.
    """

    queue_s: float
    load_s: float
    run_s: float

    @property
    def total_s(self) -> float:
        return self.queue_s + self.load_s + self.run_s


class ReplicaInfo(_Record):
    """Which replica served a request, as the worker reports it.

    Attributes:
        replica_id: Stable for the life of the replica (site, host, worker pid, model).
        host: Worker host name.
        pid: Worker process id.
        warm: True when the model was already loaded before this batch.
        batch_size: Requests that shared the backend call with this one.
    """

    replica_id: str
    host: str
    pid: int
    warm: bool
    batch_size: int


class ChargeInfo(_Record):
    """What the request cost, and to whom.

    Attributes:
        project: The project charged.
        charged_su: Service units charged (0 on the project's own site).
        estimate_su: Service units reserved before the run.
        free: Ran on the project's own (byo) site.
    """

    project: str
    charged_su: float
    estimate_su: float
    free: bool


class GenerationResult(_Record):
    """The answer to a :class:`~tpm_fed.request.GenerationRequest`.

    Attributes:
        request_id: The request's id.
        model: Model name.
        version: The exact version id (content hash) of the weights used.
        backend: ``"torch"`` or ``"vllm"``.
        site: Name of the site that ran it.
        replica: The replica that ran it.
        completions: One per prompt, in prompt order.
        usage: Tokens in and out.
        timings: Where the time went.
        notes: What the caller should know (e.g. why vLLM was not used).
        charge: Service units charged, once settled.
        placement: Why the broker chose this replica (the candidates and their scores).
    """

    request_id: str
    model: str
    version: str
    backend: str
    site: str
    replica: ReplicaInfo
    completions: list[Completion]
    usage: Usage
    timings: Timings
    notes: list[str] = []
    charge: ChargeInfo | None = None
    placement: str = ""

    @property
    def texts(self) -> list[str]:
        return [completion.text for completion in self.completions]

    @property
    def token_ids(self) -> list[list[int]]:
        return [completion.token_ids for completion in self.completions]
