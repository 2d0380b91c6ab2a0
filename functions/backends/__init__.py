"""Backends: one file each, behind :class:`functions.backends.base.Backend`.

:func:`choose_backend` turns a model's backend setting into the backend that
will serve it on this worker: ``torch`` and ``vllm`` are taken as asked
(``vllm`` fails clearly where it cannot run); ``auto`` takes vLLM where it is
installed and supports the architecture, torch otherwise, with a note saying
why.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

from functions.backends.base import Backend
from tpm_fed.protocol.errors import BackendUnavailable, ModelLoadError
from tpm_fed.protocol.model import ModelSpec


def choose_backend(spec: ModelSpec) -> tuple[str, list[str]]:
    """The backend to load for ``spec`` here, and notes for the result.

    Raises:
        BackendUnavailable: ``vllm`` was asked for and cannot serve this model here.
    """
    if spec.backend in ("torch", "encoder"):
        return spec.backend, []
    if spec.pipeline_parallel_size > 1 and spec.backend == "auto":
        # vLLM's own pipeline parallel fails on its CPU build (docs/multinode.md says how): a split
        # replica runs on the torch pipeline backend unless vLLM is asked for by name.
        return "torch", [SPLIT_ON_TORCH]
    from functions.backends.vllm_backend import vllm_support

    if vllm_missing():
        why_not = VLLM_MISSING
    else:
        why_not = vllm_support(_architecture(spec))
    if why_not is None:
        return "vllm", []
    if spec.backend == "vllm":
        raise BackendUnavailable(f"model {spec.name!r}: backend 'vllm' was asked for, but {why_not}")
    return "torch", [f"served by torch: {why_not}"]


VLLM_MISSING = ("vllm is not installed on this worker (scripts/install-vllm.sh installs it; "
                "a service started before that needs `tpm service restart`)")

SPLIT_ON_TORCH = ("served by torch in pipeline stages over several ranks (tpm-fed starts, traces and stops "
                  "its ranks); vLLM's own pipeline parallel fails on its CPU build (docs/multinode.md)")

VLLM_INSTALLED_SINCE = ("vllm was installed after this replica loaded on torch; it stays on torch while warm: "
                        "`tpm service restart` serves it with vLLM")


def vllm_missing() -> bool:
    """Whether vLLM cannot be found from this worker now (installed since it started: it can)."""
    importlib.invalidate_caches()  # a package installed since this process last looked
    return importlib.util.find_spec("vllm") is None


def notes_now(notes: list[str], loaded_without_vllm: bool) -> list[str]:
    """A warm replica's notes, plus one saying so when vLLM has been installed since it loaded.

    ``auto`` put the replica on torch because vLLM was missing; a replica stays as it
    loaded while warm, so without this note its results would keep saying that vLLM
    is not installed, long after it is.
    """
    if loaded_without_vllm and not vllm_missing():
        return [*notes, VLLM_INSTALLED_SINCE]
    return notes


def load_backend(spec: ModelSpec, backend: str) -> Backend:
    """Load ``spec`` on the named backend (imports it only when asked for)."""
    if backend == "encoder":
        from functions.backends.encoder_backend import EncoderBackend

        return EncoderBackend.load(spec)
    if backend == "vllm":
        from functions.backends.vllm_backend import VllmBackend

        return VllmBackend.load(spec)
    if spec.pipeline_parallel_size > 1:
        from functions.backends.pipeline_backend import PipelineBackend

        return PipelineBackend.load(spec)
    from functions.backends.device import resolve_device
    from functions.backends.torch_backend import TorchBackend
    from functions.policy import current_policy

    return TorchBackend.load(spec, resolve_device(current_policy().torch_device))


def _architecture(spec: ModelSpec) -> str | None:
    if spec.source == "store":  # vLLM serves it from a folder made of the version (functions.model_cache)
        from tpm_fed.storage.store_reader import StoreReader

        return (StoreReader(Path(spec.path)).config_json(spec.version).get("architectures") or [None])[0]
    config = Path(spec.path) / "config.json"
    try:
        architectures = json.loads(config.read_text()).get("architectures") or [None]
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model {spec.name!r}: cannot read {config}: {error}") from None
    return architectures[0]
