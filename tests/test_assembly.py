"""The composition root (:class:`tpm_fed.service.assembly.ServiceAssembly`): the service's parts built once, in
order, and taken down in reverse; a part that fails to build takes down what was built before it."""

from __future__ import annotations

import pytest

from tpm_fed.batches.runner import BatchRunner
from tpm_fed.service.runtime import Runtime
from tpm_fed.stores.service import Stores


@pytest.fixture
def watched(monkeypatch):
    """Every part's start and stop, in the order they happened, with what each saw of the others then."""
    events: list[tuple[str, bool]] = []
    runner_start, runner_stop, stores_init, stores_close, engine_close = (
        BatchRunner.start, BatchRunner.stop, Stores.__init__, Stores.close, Runtime.close)

    def start(self, *args, **kwargs):
        events.append(("runner started", not self.runtime._closed))  # on a running engine
        return runner_start(self, *args, **kwargs)

    def stop(self, *args, **kwargs):
        events.append(("runner stopped", not self.runtime._closed))  # before the engine closes
        return runner_stop(self, *args, **kwargs)

    def made(self, runtime, *args, **kwargs):
        events.append(("stores made", not runtime._closed))
        return stores_init(self, runtime, *args, **kwargs)

    def closed(self):
        events.append(("stores closed", not self.runtime._closed))
        return stores_close(self)

    def engine_closed(self):
        events.append(("engine closed", self.channels is not None))  # it was handed the hub at construction
        return engine_close(self)

    monkeypatch.setattr(BatchRunner, "start", start)
    monkeypatch.setattr(BatchRunner, "stop", stop)
    monkeypatch.setattr(Stores, "__init__", made)
    monkeypatch.setattr(Stores, "close", closed)
    monkeypatch.setattr(Runtime, "close", engine_closed)
    return events


def test_the_parts_are_built_in_order_served_once_and_taken_down_in_reverse(home, tmp_path, watched):
    from tpm_fed.service.app import build_app, fastapi_app
    from tpm_fed.service.assembly import ServiceAssembly
    from tpm_fed.service.auth import LocalToken

    with ServiceAssembly(home, database_url=f"sqlite:///{tmp_path / 'assembly.db'}") as service:
        assert service.engine.channels is service.channels  # handed at construction, not set from HTTP
        assert watched == [("runner started", True), ("stores made", True)]
        first, second = (fastapi_app(build_app(service, LocalToken("t", service.engine.owner))) for _ in range(2))
        # Two apps over one assembly share its parts: nothing is built per app (nor per request).
        assert first.state.service is second.state.service is service
        assert service.serving.chat.stores is service.stores and service.serving.responses.stores is service.stores
        assert service.line_routes._route("/v1/chat/completions") is not service.serving.chat  # lines: no observer
    assert watched[2:] == [("stores closed", True), ("runner stopped", True), ("engine closed", True)]
    service.close()  # once only
    assert len(watched) == 5


def test_a_part_that_fails_to_build_takes_down_the_parts_built_before_it(home, tmp_path, watched, monkeypatch):
    from tpm_fed.service.assembly import ServiceAssembly

    def broken(self, *args, **kwargs):
        raise OSError("the stores' folder cannot be made")

    monkeypatch.setattr(Stores, "__init__", broken)
    with pytest.raises(OSError, match="stores' folder"):
        ServiceAssembly(home, database_url=f"sqlite:///{tmp_path / 'broken.db'}")
    assert watched == [("runner started", True), ("runner stopped", True), ("engine closed", True)]
