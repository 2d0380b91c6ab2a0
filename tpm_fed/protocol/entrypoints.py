"""The worker's functions, by name: how the user side names code it never imports.

Sites submit a :class:`WorkerFunction`. Serialized (by Globus Compute's
serializer, for an engine or for registration), it is only its dotted name;
the endpoint worker resolves the name to the function of the tpm-fed
installed there. So nothing under ``tpm_fed/`` imports the ``functions``
package, and what runs is always the endpoint's own code, which the code
version (:mod:`tpm_fed.protocol.code_version`) pins.
"""

from __future__ import annotations

import pkgutil
from typing import Any


class WorkerFunction:
    """A function of the worker package, named as ``module:function``.

    Calling it in this process imports the worker (tests and benchmarks do
    that); pickling it keeps only the name.
    """

    def __init__(self, target: str) -> None:
        module, _, name = target.partition(":")
        if not module.startswith("functions.") or not name.isidentifier():
            raise ValueError(f"{target!r} is not functions.MODULE:FUNCTION")
        self.target = target
        self.__name__ = name
        self.__qualname__ = name
        self.__doc__ = f"The worker function {target} (resolved where it runs)."

    def resolve(self) -> Any:
        return pkgutil.resolve_name(self.target)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (pkgutil.resolve_name, (self.target,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkerFunction) and other.target == self.target

    def __hash__(self) -> int:
        return hash(self.target)

    def __repr__(self) -> str:
        return f"WorkerFunction({self.target!r})"


SERVE_BATCH = WorkerFunction("functions.serve:serve_batch")
"""Serves a batch of requests of any kind: the one function Globus Compute sites register."""

WORKER_INFO = WorkerFunction("functions.serve:worker_info")
"""Where a worker is and which model versions it holds warm."""

ECHO = WorkerFunction("functions.serve:echo")
"""Returns its argument: the bare round trip benchmarks compare against."""

SERVING_FUNCTIONS = {function.__name__: function for function in (SERVE_BATCH,)}
"""What each Globus Compute site registers, by the name the federation file records."""
