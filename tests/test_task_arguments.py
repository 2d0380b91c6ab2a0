"""A task's arguments go to the worker as JSON where JSON carries them unchanged (dill's pure-Python pickler
was ~8 ms of the service's CPU per 64-request task), and as before where it would change them: either way
the worker's ``execute_task`` calls the function with what the service gave it."""

from __future__ import annotations

import pytest
from globus_compute_sdk.serialize import ComputeSerializer
from globus_compute_sdk.serialize.concretes import JSONData

from tpm_fed.protocol.entrypoints import SERVE_BATCH
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.sites.engine import data_buffer


def _as_the_worker_reads_it(args, kwargs):
    """The task buffer built as ``EngineSite.submit`` builds it, read as the endpoint's ``execute_task`` does."""
    serializer = ComputeSerializer()
    buffer = serializer.pack_buffers([serializer.serialize(SERVE_BATCH), data_buffer(serializer, args),
                                      data_buffer(serializer, kwargs)])
    function, read_args, read_kwargs = ComputeSerializer(allowed_deserializer_types=None).unpack_and_deserialize(
        buffer)
    return function, read_args, read_kwargs, serializer.unpack_buffers(buffer)


def test_a_serving_tasks_arguments_go_as_json_and_arrive_equal():
    spec = {"name": "m", "version": "abc", "path": "/x", "backend": "torch", "dtype": None}
    requests = [GenerationRequest.create(f"The cell {i}", "m", max_new_tokens=8, temperature=0.5).to_wire()
                for i in range(64)]
    context = {"code_version": "v1", "stream": {"url": "ws://127.0.0.1:1/c", "token": "t"}}
    function, args, kwargs, buffers = _as_the_worker_reads_it((spec, requests, context), {})
    assert buffers[1].startswith(JSONData.identifier) and buffers[2].startswith(JSONData.identifier)
    assert function.__name__ == SERVE_BATCH.__name__
    assert list(args) == [spec, requests, context] and kwargs == {}


@pytest.mark.parametrize("odd", [("a", "tuple"), {1: "an int key"}, b"bytes"])
def test_a_value_json_would_change_goes_as_before_and_arrives_as_it_was(odd):
    serializer = ComputeSerializer()
    _, args, _, buffers = _as_the_worker_reads_it(({"x": [odd]},), {})
    assert not buffers[1].startswith(JSONData.identifier)
    assert buffers[1] == serializer.serialize(({"x": [odd]},))
    assert args == ({"x": [odd]},) and type(args[0]["x"][0]) is type(odd)
