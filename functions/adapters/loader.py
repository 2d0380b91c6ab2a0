"""Build registered adapters from their architecture and weights; keep the recent ones.

Only allow-listed layers are built (our code), and only safetensors weights
are read; the files must hash to the version the caller named. A module is
cached per registry, adapter version and dtype: the same adapter serves
cores of different dtypes, each in its own copy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from tpm_fed.storage.adapter_registry import AdapterRegistry, verify_version

CACHED_ADAPTERS = 64


class AdapterCache:
    def __init__(self, capacity: int = CACHED_ADAPTERS) -> None:
        self.capacity = capacity
        self._modules: OrderedDict[tuple[str, str, str], tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, registry_root: str | Path, ref: str, dtype: Any) -> tuple[Any, Any]:
        """The module and record for ``ref`` (``NAME@VERSION``), in ``dtype``.

        Raises:
            UnknownAdapter: Not registered here.
            AdapterMismatch: Its files changed, or its weights do not fit.
        """
        from safetensors.torch import load

        from functions.adapters.build import build_module

        key = (str(registry_root), ref, str(dtype))
        with self._lock:
            if key in self._modules:
                self._modules.move_to_end(key)
                return self._modules[key]
        registry = AdapterRegistry(Path(registry_root))
        record = registry.resolve(ref)
        blob = registry.weights_path(record).read_bytes()
        verify_version(record, blob)
        weights = load(blob)
        record.architecture.check_weights({name: tuple(t.shape) for name, t in weights.items()})
        module = build_module(record.architecture)
        module.load_state_dict(weights, strict=True)
        entry = (module.to(dtype).eval(), record)
        with self._lock:
            self._modules[key] = entry
            while len(self._modules) > self.capacity:
                self._modules.popitem(last=False)
        return entry


ADAPTERS = AdapterCache()
"""This worker's adapters."""
