"""Results: what came back, from which exact model version, and what it used."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator

from tpm_fed.protocol.errors import ReferenceNotFound
from tpm_fed.protocol.references import TensorsReference
from tpm_fed.protocol.tensors import unpack_tensors


class TensorReader(Protocol):
    """Reads a result's tensors by reference and writes them to files: the I/O the contract leaves to its
    users (:class:`tpm_fed.references.reader.StoreTensorReader`, :class:`~tpm_fed.references.reader.ServiceReader`)."""

    def chunks(self, request_id: str, reference: TensorsReference) -> Iterator[bytes | memoryview]: ...

    def save(self, path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> int: ...


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
    """What a request used, as charged.

    Attributes:
        prompt_tokens: Positions the core ran on (prompt tokens, or embeddings in mode 2).
        completion_tokens: Tokens generated.
        activation_bytes: Bytes of tensors returned (modes 2 and 3).
    """

    prompt_tokens: int
    completion_tokens: int
    activation_bytes: int = 0

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


class ServedResult(_Record):
    """What every answer shares: which exact model version, where, and at what cost.

    Attributes:
        request_id: The request's id.
        model: Model name.
        version: The exact version id (content hash) of the weights used.
        backend: ``"torch"`` or ``"vllm"``.
        site: Name of the site that ran it.
        replica: The replica that ran it.
        usage: Tokens in and out, and tensor bytes returned.
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
    usage: Usage
    timings: Timings
    notes: list[str] = []
    charge: ChargeInfo | None = None
    placement: str = ""


class GenerationResult(ServedResult):
    """The answer to a :class:`~tpm_fed.request.GenerationRequest`.

    Attributes:
        completions: One per prompt, in prompt order.
    """

    completions: list[Completion]

    @property
    def texts(self) -> list[str]:
        return [completion.text for completion in self.completions]

    @property
    def token_ids(self) -> list[list[int]]:
        return [completion.token_ids for completion in self.completions]


class TensorResult(ServedResult):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    tensors_blob: bytes = b""
    """Every returned tensor, as one safetensors blob (names are ``PROMPT:NAME``), when it came inline."""

    @field_validator("tensors_blob", mode="before")
    @classmethod
    def _base64_on_the_wire(cls, value: Any) -> Any:
        """On a wire the blob is URL-safe base64 text: a worker's JSON reply (``functions.serve.json_ready``)
        and the service's answers (``ser_json_bytes``) use the same alphabet."""
        if isinstance(value, str):
            import base64

            return base64.b64decode(value, altchars=b"-_", validate=True)
        return value

    tensors_ref: TensorsReference | None = None
    """Where the blob waits instead, when it was too large to come inline (results by reference)."""

    _reader: TensorReader | None = PrivateAttr(default=None)
    # Who reads tensors_ref and writes files for this result (the contract itself does no I/O): the Client
    # that got it sets its own (the store directly, else the service); in the service, the bookkeeper sets
    # one that reads the stores this process can open.

    def with_reader(self, reader: TensorReader) -> Self:
        """This result, reading its tensors (and writing them to files) through ``reader``."""
        self._reader = reader
        return self

    @cached_property
    def tensors(self) -> dict[str, Any]:
        """Every returned tensor by name, as numpy arrays (a reference is read on first use).

        Raises:
            ReferenceExpired, ReferenceNotFound, ReferenceCorrupt: A reference could not be read.
        """
        if self.tensors_ref is None:
            return unpack_tensors(self.tensors_blob)
        return unpack_tensors(b"".join(self.tensor_chunks()))

    def tensor_chunks(self) -> Iterator[bytes | memoryview]:
        """The safetensors blob piece by piece (one chunk in memory at a time), inline or by reference."""
        if self.tensors_ref is None:
            return iter([self.tensors_blob])
        return self._attached_reader().chunks(self.request_id, self.tensors_ref)

    def save_tensors(self, path: str | os.PathLike) -> int:
        """Write the returned tensors to ``path`` as one ``.safetensors`` file, chunk by chunk; its size.

        A large result by reference is never held in memory whole. The file
        appears complete or not at all (written beside it, then renamed).
        """
        return self._attached_reader().save(path, self.tensor_chunks())

    def _attached_reader(self) -> TensorReader:
        if self._reader is None:
            where = f"are in {self.tensors_ref.store}" if self.tensors_ref is not None else "came inline"
            raise ReferenceNotFound(f"request {self.request_id}: its tensors {where}, and this result has no "
                                    "reader (this process cannot read them): read them with the Client that "
                                    "got the result")
        return self._reader


@dataclass(frozen=True)
class LensReading:
    """Top-k tokens of a lens: ``ids[..., k]`` (numpy int32) with their ``probs``, ``tokens`` and ``texts``.

    ``tokens`` are the vocabulary's pieces (``'Ġis'`` in a byte-level BPE);
    ``texts`` the text each stands for, decoded alone by the tokenizer (``' is'``).
    """

    ids: Any
    probs: Any
    tokens: list
    texts: list


class TraceResult(TensorResult):
    """The answer to a :class:`~tpm_fed.interventions.TraceRequest`.

    Attributes:
        prompt_tokens: Each prompt's tokens as the vocabulary's pieces, so positions can be read off.
        prompt_texts: The same tokens, each as the text it stands for (decoded alone).
        vocab: Token id -> vocabulary piece for every id a lens returned (``'Ġis'``).
        texts: Token id -> the text it stands for, for the same ids (``' is'``).
        completions: Generated text, when ``max_new_tokens`` was above 0.
    """

    prompt_tokens: list[list[str]]
    prompt_texts: list[list[str]] = []
    vocab: dict[str, str] = {}
    texts: dict[str, str] = {}
    completions: list[Completion] = []

    def saved(self, name: str, prompt: int = 0):
        """The tensor a save step returned for ``prompt`` (``[positions, *features]``)."""
        key = f"{prompt}:{name}"
        if key not in self.tensors:
            names = sorted({k.split(":", 1)[1] for k in self.tensors})
            raise KeyError(f"no tensor {name!r} for prompt {prompt}; returned: {', '.join(names)}")
        return self.tensors[key]

    def logit_lens(self, prompt: int = 0) -> LensReading:
        """Per layer and position: the top-k tokens of the residual stream."""
        return self._lens("logit_lens", prompt)

    def attention_lens(self, prompt: int = 0) -> LensReading:
        """Per layer, head and position: the top-k tokens of the head's contribution."""
        return self._lens("attention_lens", prompt)

    def attention_patterns(self, prompt: int = 0):
        """Attention weights ``[layers, heads, query, key]`` of ``prompt``."""
        return self.saved("attention_patterns", prompt)

    def _lens(self, kind: str, prompt: int) -> LensReading:
        import numpy as np

        ids = self.saved(f"{kind}.ids", prompt)
        flat = [str(i) for i in ids.flatten().tolist()]
        tokens = np.array([self.vocab.get(i, "?") for i in flat], dtype=object).reshape(ids.shape).tolist()
        texts = np.array([self.texts.get(i, "?") for i in flat], dtype=object).reshape(ids.shape).tolist()
        return LensReading(ids=ids, probs=self.saved(f"{kind}.probs", prompt), tokens=tokens, texts=texts)


class EmbeddingResult(TensorResult):
    """The answer to an :class:`~tpm_fed.adapters.EmbeddingRequest`: one output per input."""

    @property
    def outputs(self) -> list:
        """The head's output (or the final hidden states) for each input, in order."""
        return [self.tensors[str(index)] for index in range(len(self.tensors))]


class SessionStepResult(_Record):
    """One step of a session: its tokens, generated text and usage (its tensors are in the session's blob).

    Attributes:
        name: The step's name.
        prompt_tokens: Each prompt's tokens as the vocabulary's pieces.
        prompt_texts: The same tokens, each as the text it stands for.
        vocab: Token id -> vocabulary piece for every id a lens returned.
        texts: Token id -> the text it stands for, for the same ids.
        completions: Generated text, when the step generated.
        usage: What this step used.
        charged_su: This step's line of the session's charge (the lines add up to it).
    """

    name: str
    prompt_tokens: list[list[str]]
    prompt_texts: list[list[str]] = []
    vocab: dict[str, str] = {}
    texts: dict[str, str] = {}
    completions: list[Completion] = []
    usage: Usage
    charged_su: float = 0.0


class SessionResult(TensorResult):
    """The answer to a :class:`~tpm_fed.protocol.sessions.SessionRequest`: one line per step.

    Tensors are named ``STEP/PROMPT:NAME`` in one blob (inline or by reference).
    """

    steps: list[SessionStepResult]

    def step(self, name: str) -> SessionStepResult:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(f"no step {name!r}; steps: {', '.join(s.name for s in self.steps)}")

    def saved(self, step: str, name: str, prompt: int = 0):
        """The tensor save ``name`` of step ``step`` returned for ``prompt``."""
        key = f"{step}/{prompt}:{name}"
        if key not in self.tensors:
            raise KeyError(f"no tensor {name!r} of step {step!r} for prompt {prompt}; returned: "
                           f"{', '.join(sorted(self.tensors))}")
        return self.tensors[key]
