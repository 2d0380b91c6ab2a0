"""The per-worker replica cache: load a model once, serve it for many tasks.

Endpoint workers are long-lived processes, so a module-level cache outlives
the task that filled it. Each worker holds at most ``capacity`` replicas
(one by default: a worker is one replica slot); asking for another model
version evicts the least recently used one.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from functions.backends import VLLM_MISSING, choose_backend, load_backend, notes_now
from functions.backends.base import Backend
from tpm_fed.protocol.errors import ModelLoadError, UnknownVersion
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.versions import hash_model_dir


@dataclass
class Replica:
    """A loaded model version inside this worker process."""

    spec: ModelSpec
    backend: Backend
    load_s: float
    replica_id: str
    notes: list[str] = field(default_factory=list)
    loaded_without_vllm: bool = False
    """``auto`` chose torch because vLLM was not installed (it may be by now)."""


class ReplicaCache:
    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._replicas: OrderedDict[tuple[str, str], Replica] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: ModelSpec) -> tuple[Replica, bool]:
        """The replica for ``spec`` and whether it was already warm.

        Raises:
            ModelLoadError: The model directory is missing or corrupt.
            UnknownVersion: The directory no longer holds the version asked for.
            BackendUnavailable: The spec pins a backend this worker cannot run.
        """
        with self._lock:
            replica = self._replicas.get(spec.key)
            if replica is not None:
                self._replicas.move_to_end(spec.key)
                notes = notes_now(replica.notes, replica.loaded_without_vllm)
                return (replica if notes is replica.notes else replace(replica, notes=notes)), True
            while len(self._replicas) >= self.capacity:
                _, evicted = self._replicas.popitem(last=False)
                evicted.backend.close()
            replica = _load(spec)
            self._replicas[spec.key] = replica
            return replica, False

    def evict(self, spec: ModelSpec) -> None:
        """Drop ``spec``'s replica (it failed as a whole): closed now, loaded afresh when next asked for."""
        with self._lock:
            replica = self._replicas.pop(spec.key, None)
        if replica is not None:
            replica.backend.close()

    def loaded(self) -> list[ModelSpec]:
        with self._lock:
            return [replica.spec for replica in self._replicas.values()]


def _load(spec: ModelSpec) -> Replica:
    started = time.perf_counter()
    if not os.path.isdir(spec.path):
        raise ModelLoadError(f"model {spec.name!r}: directory not found: {spec.path}")
    # A store version is checked chunk by chunk as it loads; a directory by its hash.
    on_disk = spec.version if spec.source == "store" else hash_model_dir(Path(spec.path))
    if on_disk != spec.version:
        raise UnknownVersion(
            f"model {spec.name!r}: version {spec.version} is not here; {spec.path} "
            f"holds version {on_disk}"
        )
    backend_name, notes = choose_backend(spec)
    backend = load_backend(spec, backend_name)
    replica_id = f"{socket.gethostname()}:{os.getpid()}:{spec.name}@{spec.version}:{backend_name}"
    return Replica(
        spec=spec,
        backend=backend,
        load_s=time.perf_counter() - started,
        replica_id=replica_id,
        notes=notes,
        loaded_without_vllm=any(VLLM_MISSING in note for note in notes),
    )


REPLICAS = ReplicaCache(capacity=int(os.environ.get("TPM_REPLICAS_PER_WORKER", "1")))
"""This worker's cache; one per process, filled by the first task that needs it."""
