"""Globus Compute results over a real AMQP socket, with the faults a broker link has.

The SDK's ``Executor`` and its own ``_ResultWatcher`` run unmodified against
a real RabbitMQ server (tests/rabbitmq.py); the web service's HTTP side is
answered by :class:`tests.compute_service.ComputeService`, which publishes
each task's result to the task group's queue. The watcher reaches the broker
through a loopback TCP proxy (tests/tcp_proxy.py) so the link can lose bytes
or be cut. The watcher class is subclassed only to record what it was
delivered; every message still goes through the SDK's own code.

What must hold whatever the link does: every request resolves once, is
charged once, and the ledger holds no reservation afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import responses

from tests.compute_service import RESULT_QUEUE_PREFIX, ComputeService, use_service_credentials
from tests.service_helpers import tpm_in_process
from tests.tcp_proxy import TcpProxy
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.models.demo import DemoModelRecipe, make_demo_model
from tpm_fed.service.runtime import Runtime

pytestmark = pytest.mark.slow

WAIT_S = 300  # a bound on waiting for the machine, never an assertion about speed
PROMPTS = ["The telescope", "A star"]


def wait_for(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


class Deliveries(list):
    """(task id, redelivered flag) of every message the SDK's watcher was handed, in order."""

    def of(self, task_id: str) -> list[bool]:
        return [redelivered for delivered, redelivered in self if delivered == task_id]


def recording_watcher(deliveries: Deliveries) -> type:
    from globus_compute_common import messagepack
    from globus_compute_sdk.sdk.executor import _ResultWatcher

    class RecordingResultWatcher(_ResultWatcher):
        def _on_message(self, channel, basic_deliver, props, body):
            deliveries.append((str(messagepack.unpack(body).task_id), bool(basic_deliver.redelivered)))
            super()._on_message(channel, basic_deliver, props, body)

    return RecordingResultWatcher


class Cloud:
    """The web service, the broker, the proxy the SDK reaches the broker through, and a federation."""

    def __init__(self, service: ComputeService, broker, proxy: TcpProxy, home: TpmHome, deliveries: Deliveries):
        self.service, self.broker, self.proxy, self.home, self.deliveries = service, broker, proxy, home, deliveries

    def queue(self) -> tuple[int, int]:
        """(ready messages, consumers) of the one task-group queue made so far."""
        import pika

        [task_group] = self.service.result_queues
        connection = pika.BlockingConnection(pika.URLParameters(self.broker.url))
        try:
            declared = connection.channel().queue_declare(RESULT_QUEUE_PREFIX + task_group, passive=True)
        finally:
            connection.close()
        return declared.method.message_count, declared.method.consumer_count


@pytest.fixture(scope="module")
def amqp_cloud(rabbitmq, tmp_path_factory):
    import globus_compute_sdk.sdk.executor as sdk_executor

    proxy = TcpProxy(rabbitmq.port)
    service = ComputeService(run_dir=tmp_path_factory.mktemp("endpoint"), amqp_publish_url=rabbitmq.url,
                             amqp_consumer_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F")
    home = TpmHome(tmp_path_factory.mktemp("amqp-home"))
    home.models_dir.mkdir(parents=True)
    # The demo model's shape, barely trained: these tests are about the result path,
    # not the text, and training the full demo model is minutes on a busy machine.
    make_demo_model(home.models_dir / DEMO_MODEL_NAME, DemoModelRecipe(train_steps=1), progress=False)
    endpoint_id = service.add_endpoint()
    Federation(
        name="amqp-tests",
        sites=[SiteConfig(name="local"),
               SiteConfig(name="gc", access="globus-compute", endpoint_id=endpoint_id, cold_start_s=1.0)],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch")],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()],
                                allocations={"local": 1e6, "gc": 1e6})],
    ).dump(home.federation_file)

    deliveries = Deliveries()
    service.start()
    try:
        with pytest.MonkeyPatch.context() as patch, responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            use_service_credentials(patch, tmp_path_factory.mktemp("globus"))
            patch.setenv("TPM_HOME", str(home.root))
            patch.setattr(sdk_executor, "_ResultWatcher", recording_watcher(deliveries))
            service.install(mock)
            # The id is recorded through the home's service, which is stopped after: the tests use a Runtime.
            registered = tpm_in_process(home.root, patch, "functions", "register", "--site", "gc")
            assert registered.exit_code == 0, registered.output
            yield Cloud(service, rabbitmq, proxy, home, deliveries)
            end_result_watchers()
    finally:
        service.stop()
        proxy.close()


def end_result_watchers() -> None:
    """End the SDK's result watchers while the web service still answers them.

    The SDK keeps a task group's watcher (and its AMQP connection) after its
    executor shuts down; one left by an earlier test would also be cut by the
    broker and reconnect through the proxy, and be counted as this test's.
    """
    import globus_compute_sdk.sdk.executor as sdk_executor

    for watcher in list(sdk_executor._RESULT_WATCHERS.values()):
        watcher.shutdown(wait=False, cancel_futures=True)
        watcher.join(timeout=60)


@pytest.fixture
def cloud(amqp_cloud):
    """Each test starts from a clean link, no held or doubled results, no task groups or watchers."""
    amqp_cloud.proxy.cut()
    amqp_cloud.service.duplicate_results = False
    amqp_cloud.service.hold_results = False
    amqp_cloud.service.result_queues.clear()
    amqp_cloud.deliveries.clear()
    yield amqp_cloud
    end_result_watchers()


def assert_charged_once(runtime: Runtime, result) -> None:
    charges = [c for c in runtime.ledger.statement("tests") if c.request_id == result.request_id]
    assert len(charges) == 1, charges
    [charge] = charges
    assert charge.state == "settled" and charge.site == "gc"
    assert charge.charged_usu == round(result.charge.charged_su * 1e6) > 0
    assert all(b.reserved_usu == 0 for b in runtime.ledger.balances("tests"))


def test_results_are_consumed_over_a_real_socket(cloud):
    published = cloud.service.results_published
    with Runtime(cloud.home) as runtime:
        result = runtime.generate(PROMPTS, max_new_tokens=6, project="tests", site="gc").result(timeout=WAIT_S)
        assert_charged_once(runtime, result)
    assert result.site == "gc" and len(result.token_ids) == 2 and all(result.token_ids)
    [(task_id, redelivered)] = cloud.deliveries  # one message, handed over by the broker
    assert redelivered is False
    assert cloud.service.results_published == published + 1
    assert cloud.proxy.connections_accepted >= 1  # the watcher came through the socket
    ready, _ = cloud.queue()
    assert ready == 0  # consumed, and acknowledged: nothing left for anyone else


def test_a_duplicate_result_is_ignored_and_the_request_charged_once(cloud):
    cloud.service.duplicate_results = True
    with Runtime(cloud.home) as runtime:
        first = runtime.generate(PROMPTS, max_new_tokens=6, project="tests", site="gc").result(timeout=WAIT_S)
        [(task_id, _)] = cloud.deliveries[:1]
        wait_for("the duplicate to reach the watcher", lambda: len(cloud.deliveries.of(task_id)) == 2)
        assert_charged_once(runtime, first)

        cloud.service.duplicate_results = False
        second = runtime.generate(PROMPTS, max_new_tokens=6, project="tests", site="gc").result(timeout=WAIT_S)
        assert_charged_once(runtime, second)
        assert len(runtime.ledger.statement("tests")) == len({c.request_id for c in runtime.ledger.statement("tests")})
    assert cloud.deliveries.of(task_id) == [False, False]
    assert second.token_ids == first.token_ids  # greedy: the stale duplicate did not answer the new request


def test_a_redelivered_result_is_ignored_after_the_acknowledgement_is_lost(cloud):
    cloud.service.hold_results = True
    with Runtime(cloud.home) as runtime:
        future = runtime.generate(PROMPTS, max_new_tokens=6, project="tests", site="gc")
        wait_for("the task's result and the watcher's consumer",
                 lambda: cloud.service.held_results() == 1 and cloud.queue()[1] == 1)
        accepted = cloud.proxy.connections_accepted
        cloud.proxy.lose_client_bytes()  # the watcher's acknowledgement will never reach the broker
        cloud.service.release_results()
        result = future.result(timeout=WAIT_S)
        [(task_id, _)] = cloud.deliveries

        cloud.proxy.cut()  # the link drops: the broker requeues the unacknowledged result
        wait_for("the watcher to reconnect and be handed the result again", lambda: len(cloud.deliveries) == 2)
        assert cloud.deliveries.of(task_id) == [False, True]
        assert cloud.proxy.connections_accepted == accepted + 1
        assert_charged_once(runtime, result)

        after = runtime.generate(PROMPTS, max_new_tokens=6, project="tests", site="gc").result(timeout=WAIT_S)
        assert_charged_once(runtime, after)
    assert after.token_ids == result.token_ids


def test_a_consumer_reconnects_after_the_broker_drops_its_connection(cloud):
    cloud.service.hold_results = True
    with Runtime(cloud.home) as runtime:
        future = runtime.generate(PROMPTS, max_new_tokens=6, project="tests", site="gc")
        wait_for("the task's result and the watcher's consumer",
                 lambda: cloud.service.held_results() == 1 and cloud.queue()[1] == 1)
        accepted = cloud.proxy.connections_accepted
        cloud.broker.close_all_connections()
        cloud.service.release_results()  # published while the watcher is away: it waits in the queue
        result = future.result(timeout=WAIT_S)
        assert_charged_once(runtime, result)
    assert cloud.proxy.connections_accepted == accepted + 1  # the SDK's watcher opened a new connection
    [(_, redelivered)] = cloud.deliveries
    assert redelivered is False  # never handed over before the drop
