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


def test_dispatchers_on_their_own_threads_submit_into_the_engine_one_at_a_time(tmp_path):
    """Parsl's executor sends every task on one ZeroMQ socket and numbers tasks without a lock: two replicas'
    dispatchers submitting at once aborted a test run in libzmq. The site lets one submit in at a time."""
    import threading
    import time

    from tpm_fed.sites.engine import EngineSite

    class Engine:
        inside = most = submitted = 0
        lock = threading.Lock()

        def submit(self, future, packed, **kwargs):
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            time.sleep(0.005)  # the send, long enough for another thread to arrive
            with self.lock:
                self.inside -= 1
                self.submitted += 1

    site = EngineSite("s", tmp_path)
    site._engine, site._serializer = Engine(), ComputeSerializer()
    threads = [threading.Thread(target=site.submit, args=(SERVE_BATCH, {"name": "m"}, [], {})) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert site._engine.submitted == 8 and site._engine.most == 1


def test_the_engines_own_resubmissions_take_turns_with_the_dispatchers(tmp_path):
    """The endpoint engine resubmits a task lost with its worker from its result thread, straight into its
    executor: that send takes its turn with the dispatchers' too."""
    import threading
    import time

    from tpm_fed.sites.engine import EngineSite

    class Executor:
        inside = most = sent = 0
        lock = threading.Lock()

        def submit_payload(self, context, buffer):
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            time.sleep(0.005)
            with self.lock:
                self.inside -= 1
                self.sent += 1

    class Engine:
        executor = Executor()

        def start(self, **kwargs):
            pass

        def submit(self, future, packed, **kwargs):
            self.executor.submit_payload({}, packed)

    class Site(EngineSite):
        def _make_engine(self):
            return Engine()

    site = Site("s", tmp_path)
    site.start()
    try:
        executor = site._engine.executor
        threads = [threading.Thread(target=site.submit, args=(SERVE_BATCH, {"name": "m"}, [], {})) for _ in range(4)]
        threads += [threading.Thread(target=executor.submit_payload, args=({}, b"again")) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert executor.sent == 8 and executor.most == 1
    finally:
        site._engine = None  # nothing to shut down
