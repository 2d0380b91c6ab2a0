"""What a worker sends back is data: JSON, parsed here, never unpickled.

A worker is not trusted by the service: another local user can attach a
pool to an engine, and a byo endpoint is run by its owner. Globus Compute's
default result serializer is dill, and unpickling runs whatever the pickle
names, so a worker that answered with a pickle could run code in the
service. Every way of reaching a site therefore asks the endpoint to
serialize results as ``JSONData`` (:data:`JSON_RESULTS`, the engine's and the
SDK's ``result_serializers``) and reads them with :func:`data_from_result`:
the strategy header is checked first, and anything but JSON is refused with
:class:`~tpm_fed.protocol.errors.ResultNotData` before a byte of it is
decoded. The serving functions' replies are JSON-ready already
(``functions/serve.py``).
"""

from __future__ import annotations

import json
from typing import Any

from tpm_fed.protocol.errors import ResultNotData

JSON_RESULTS = "globus_compute_sdk.serialize.concretes.JSONData"
"""The serialization strategy (its import path) a site asks its endpoint to send results in."""

JSON_HEADER = "11\n"
"""The header Globus Compute puts before a ``JSONData`` payload (``JSONData.identifier``)."""


def data_from_result(site: str, payload: Any) -> Any:
    """The value a worker returned, from its ``JSONData`` payload.

    Raises:
        ResultNotData: The payload is not ``JSONData`` (a pickle, code...) or not valid JSON;
            it is never decoded further.
    """
    if not isinstance(payload, str) or not payload.startswith(JSON_HEADER):
        header = payload[:3] if isinstance(payload, (str, bytes)) else type(payload).__name__
        raise ResultNotData(
            f"site {site!r}: a worker sent a result that is not JSON data (serialization header {header!r}); "
            "it was refused unread (a worker that pickles its results is not the endpoint's own worker, "
            "or its Globus Compute is older than result_serializers)"
        )
    try:
        return json.loads(payload[len(JSON_HEADER):])
    except ValueError as error:
        raise ResultNotData(f"site {site!r}: a worker's JSON result does not parse: {error}") from None


def json_results_serializer(site: str) -> Any:
    """A ``ComputeSerializer`` for an SDK ``Client``/``Executor`` that reads results only as JSON.

    Arguments still go out with the SDK's own strategies (the service sends
    functions by name and plain data); only the way back is narrowed, to
    :func:`data_from_result`. The SDK's own allow-list cannot say this: it
    must admit a code strategy, and every code strategy runs code when read.
    """
    from globus_compute_sdk.serialize import ComputeSerializer

    class JsonResultsSerializer(ComputeSerializer):
        def deserialize(self, payload: str) -> Any:  # the SDK reads every result through here
            return data_from_result(site, payload)

    return JsonResultsSerializer()
