"""One handler per request kind: the worker half of the kinds table.

A handler answers every request of its kind in a batch, on a backend that
has the kind's capability (checked before it is called), under this
endpoint's policy::

    handle(backend, requests, policy) -> one outcome per request, in order
    outcome: {"result": {...}} or {"error": {"type", "message"}}

:data:`HANDLERS` is keyed by the names of :data:`tpm_fed.protocol.kinds.KINDS`
(a test holds the two equal): adding a kind is one row there plus one
module here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from functions.handlers import embed, encode, generate, session, trace
from functions.policy import WorkerPolicy

Handler = Callable[[Any, list[Any], WorkerPolicy], list[dict[str, Any]]]

HANDLERS: dict[str, Handler] = {
    "generate": generate.handle,
    "embed": embed.handle,
    "trace": trace.handle,
    "session": session.handle,
    "encode": encode.handle,
}
