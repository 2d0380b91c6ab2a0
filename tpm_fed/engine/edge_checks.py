"""The checks a request passes where it enters, one per kind: the request to run (adapters pinned),
the model version that runs it, and the most it may use.

A table keyed by kind (``tests/test_engine_runtime.py`` checks that it names
exactly the kinds of :data:`tpm_fed.protocol.kinds.KINDS`): a new kind adds a
row here and one in the kinds table, and nothing else branches on its name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tpm_fed.adapters.check import pin_adapters
from tpm_fed.catalog import ModelCatalog
from tpm_fed.storage.adapter_registry import AdapterRegistry
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import ServingRequest, UsageBound
from tpm_fed.protocol.validation import check_session, check_trace

Checked = tuple[ServingRequest, ModelSpec, UsageBound]


def _generate(request: Any, spec: ModelSpec, resolved: Any, catalog: ModelCatalog,
              adapters: AdapterRegistry) -> Checked:
    catalog.check(request, resolved)
    if request.backend is not None and request.backend != spec.backend:
        spec = spec.model_copy(update={"backend": request.backend})
    return request, spec, request.usage_bound()


def _trace(request: Any, spec: ModelSpec, resolved: Any, catalog: ModelCatalog,
           adapters: AdapterRegistry) -> Checked:
    return request, spec, check_trace(request, catalog.points(spec), spec.dtype)


def _session(request: Any, spec: ModelSpec, resolved: Any, catalog: ModelCatalog,
             adapters: AdapterRegistry) -> Checked:
    return request, spec, check_session(request, catalog.points(spec), spec.dtype)


def _embed(request: Any, spec: ModelSpec, resolved: Any, catalog: ModelCatalog,
           adapters: AdapterRegistry) -> Checked:
    pinned, bound = pin_adapters(request, adapters, catalog.hidden_size(spec))
    return pinned, spec, bound


def _encode(request: Any, spec: ModelSpec, resolved: Any, catalog: ModelCatalog,
            adapters: AdapterRegistry) -> Checked:
    return request, spec, catalog.encode_bound(request, resolved)


EDGE_CHECKS: dict[str, Callable[..., Checked]] = {
    "generate": _generate, "trace": _trace, "session": _session, "embed": _embed, "encode": _encode,
}
"""Each kind's check (request, spec, resolved model, catalog, adapter registry) -> :data:`Checked`."""



def check_at_edge(request: ServingRequest, resolved: Any, catalog: ModelCatalog,
                  adapters: AdapterRegistry) -> Checked:
    """The request to run, the spec to run it on, its usage bound (raises a typed error if refused)."""
    spec = resolved.spec
    backend = KINDS[request.kind].backend_for(spec.backend)  # one with the capability this kind needs
    if backend != spec.backend:
        spec = spec.model_copy(update={"backend": backend})
    return EDGE_CHECKS[request.kind](request, spec, resolved, catalog, adapters)
