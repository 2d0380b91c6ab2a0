"""The table of request kinds: the one place a kind is described.

A kind names a request class, its result class, the backend capability a
worker needs to serve it, the backends that have that capability, whether
it joins a running task and on which backends, whether its text streams,
what it is billed as, and whether it is charged by step. The same name keys
the federation's price table, a model's ``kinds`` list, the ledger's records
and the CLI. Adding a kind is one row here plus its handler in
:mod:`functions.handlers`; nothing else branches on a kind's name (the
structure tests look).

The paper's three inference modes are kinds: ``generate`` (mode 1, query
only), ``embed`` (mode 2, customized embeddings) and ``trace`` (mode 3,
intermediary access). A ``session`` is several traces on one replica
(:mod:`tpm_fed.protocol.sessions`): priced as traces, and served by every
model that serves traces. ``encode`` is query-only work on an encoder model
(:mod:`tpm_fed.protocol.encoding`): texts to normalized retrieval vectors,
charged per input token, served by the ``encoder`` backend alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tpm_fed.protocol.encoding import EncodeRequest, EncodeResult
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.model import Backend
from tpm_fed.protocol.requests import EmbeddingRequest, GenerationRequest, ServingRequest, TraceRequest
from tpm_fed.protocol.results import EmbeddingResult, GenerationResult, ServedResult, SessionResult, TraceResult
from tpm_fed.protocol.sessions import SessionRequest

KindName = Literal["generate", "embed", "trace", "encode"]
"""The kinds a model lists and a price is set for (a session is a run of traces)."""
Capability = Literal["generate", "trace", "hidden_states", "encode"]


@dataclass(frozen=True)
class Kind:
    """One kind of request.

    Attributes:
        name: The kind's one name, everywhere.
        mode: The paper's inference mode (1, 2 or 3).
        request: The request class.
        result: The result class.
        capability: What a backend must be able to do to serve it.
        backends: Backends with that capability, preferred first.
        family: What it is billed as: the kind whose price it pays and that a model must list to serve it.
        joins_on: Backends on which a request of this kind may join a task already running on its replica
            (continuous batching: the engine takes it at its next step); empty: it waits for a task of its own.
        streams: Whether its text may stream back while its task runs (the back channel).
        charged_by_step: One charge line per step of the request (a session's traces), not one for it all.
    """

    name: str
    mode: int
    request: type[ServingRequest]
    result: type[ServedResult]
    capability: Capability
    backends: tuple[Backend, ...]
    family: KindName
    joins_on: tuple[Backend, ...] = ()
    streams: bool = False
    charged_by_step: bool = False

    def backend_for(self, model_backend: str) -> str:
        """The backend a model set to ``model_backend`` serves this kind on: its own where that backend
        has the capability (``auto`` where the worker chooses among several that have it), else the
        first backend that has it."""
        if model_backend in self.backends or (model_backend == "auto" and len(self.backends) > 1):
            return model_backend
        return self.backends[0]

    def may_join(self, model_backend: str) -> bool:
        """Whether a request of this kind may join a task running on a model set to ``model_backend``
        (``auto`` may turn out to be one of :attr:`joins_on`; the worker's join poller asks only if so)."""
        return bool(self.joins_on) and (model_backend == "auto" or model_backend in self.joins_on)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("generate", 1, GenerationRequest, GenerationResult, "generate", ("vllm", "torch"), "generate",
             joins_on=("vllm",), streams=True),
        Kind("embed", 2, EmbeddingRequest, EmbeddingResult, "hidden_states", ("torch",), "embed"),
        Kind("trace", 3, TraceRequest, TraceResult, "trace", ("torch",), "trace"),
        Kind("session", 3, SessionRequest, SessionResult, "trace", ("torch",), "trace", charged_by_step=True),
        Kind("encode", 1, EncodeRequest, EncodeResult, "encode", ("encoder",), "encode"),
    )
}

RENAMED_KINDS = {"query": "generate", "embedding": "embed", "intermediary": "trace"}
"""Kinds' former names (a federation file or a database from before the rename is read with these)."""


def kind_of(name: str) -> Kind:
    """The row for ``name``.

    Raises:
        InvalidRequest: No such kind.
    """
    if name not in KINDS:
        raise InvalidRequest(f"kind: unknown request kind {name!r}; known: {', '.join(KINDS)}")
    return KINDS[name]


def request_from_wire(data: Any) -> ServingRequest:
    """Rebuild any kind of request from its wire form (its ``kind`` says which).

    Raises:
        InvalidRequest: Not a mapping, an unknown kind, or fields that do not validate.
    """
    if not isinstance(data, dict):
        raise InvalidRequest(f"a request is a JSON object of fields, not {type(data).__name__}")
    return kind_of(str(data.get("kind", "generate"))).request.from_wire(data)
