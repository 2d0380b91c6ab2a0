"""The Globus Compute web service as the SDK reaches it, answered at the HTTP layer.

The cloud cannot be reached from here, so the SDK's real HTTP requests are
intercepted with ``responses`` (as the SDK's own test suite does) and
answered the way the service answers them:

- ``POST /v3/functions`` keeps the function exactly as the SDK packed it;
- ``POST /v3/endpoints/{id}/submit`` builds each task the way the service
  does (the function's packed code followed by the packed arguments) and
  runs it on a real ``GlobusComputeEngine`` (Parsl HTEX workers on this
  machine), honouring the endpoint's ``allowed_functions``;
- ``POST /v2/oauth2/token`` (Globus Auth) grants tokens for a service
  identity, for a pasted authorization code, or dependent tokens for a
  caller's token (:attr:`ComputeService.dependent_grants`: a service acting
  for its callers), with an ``id_token`` signed
  by a key made here (its JWKS is served too), so the SDK's own login flow
  and token validation run unmodified; ``/v2/oauth2/token/revoke`` takes
  the tokens back on logout;
- results go back as the engine packed them. With ``amqp_publish_url`` set,
  they are published to a real RabbitMQ queue per task group
  (``GET /v2/get_amqp_result_connection_url`` tells the SDK where), and the
  SDK's own ``_ResultWatcher`` consumes them over a real socket
  (tests/test_globus_compute_amqp.py); ``duplicate_results`` publishes each
  result twice and ``hold_results`` keeps them back until
  :meth:`ComputeService.release_results`. Without it, the AMQP socket is the
  one part replaced: a result watcher that reads a per-task-group queue in
  this process hands each message to the SDK's own
  ``_ResultWatcher._on_message`` and ``_match_results_to_futures``, which
  deserialize it and resolve (or fail) the caller's future.

Every request body is kept in :attr:`ComputeService.submissions`, with the
``Authorization`` header it came with, so tests can assert who submitted,
the endpoint id, function id, arguments, ``user_endpoint_config`` and
``resource_specification`` the SDK put on the wire.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import responses

COMPUTE = "https://compute.api.globus.org"
AUTH = "https://auth.globus.org"
COMPUTE_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
ACCESS_TOKEN = "tpm-test-access-token"


@dataclass
class EndpointState:
    status: str = "online"
    allowed_functions: list[str] | None = None  # None: any function may run


@dataclass
class ComputeService:
    """The web service's state: functions, endpoints, queued results; one real engine runs the tasks."""

    run_dir: Path
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[str, EndpointState] = field(default_factory=dict)
    submissions: list[dict[str, Any]] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    dependent_grants: dict[str, str] = field(default_factory=dict)  # caller's token -> Compute token granted for it
    result_queues: dict[str, queue.Queue] = field(default_factory=dict)
    amqp_publish_url: str | None = None  # where results are published (the broker itself)
    amqp_consumer_url: str | None = None  # what the SDK is told to consume from (default: the same)
    duplicate_results: bool = False
    hold_results: bool = False
    results_published: int = 0
    _held: list[tuple[str, bytes]] = field(default_factory=list)
    _publish_lock: threading.Lock = field(default_factory=threading.Lock)
    _engine: Any = None

    # -- the engine ---------------------------------------------------------

    def start(self) -> None:
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from parsl.providers import LocalProvider

        bin_dir = os.path.dirname(sys.executable)
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        self._engine = GlobusComputeEngine(
            label="compute-service-endpoint",
            address="127.0.0.1",
            max_workers_per_node=1,
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
            job_status_kwargs={"strategy_period": 0.5},
            encrypted=False,
        )
        self._engine.start(endpoint_id=uuid.uuid4(), run_dir=str(self.run_dir))

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()

    def add_endpoint(self, status: str = "online", allowed_functions: list[str] | None = None) -> str:
        endpoint_id = str(uuid.uuid4())
        self.endpoints[endpoint_id] = EndpointState(status, allowed_functions)
        return endpoint_id

    # -- HTTP routes ----------------------------------------------------------

    def install(self, mock: responses.RequestsMock) -> None:
        import re

        mock.add_callback("POST", f"{AUTH}/v2/oauth2/token", callback=self._token)
        mock.add_callback("POST", f"{AUTH}/v2/oauth2/token/revoke", callback=self._revoke)
        mock.add("GET", f"{AUTH}/.well-known/openid-configuration", json={
            "issuer": AUTH, "jwks_uri": f"{AUTH}/jwk.json", "id_token_signing_alg_values_supported": ["RS512"],
        })
        mock.add("GET", f"{AUTH}/jwk.json", json={"keys": [_signing_key().public_jwk]})
        mock.add_callback("GET", f"{COMPUTE}/v2/version", callback=self._version)
        mock.add_callback("POST", f"{COMPUTE}/v3/functions", callback=self._register)
        mock.add_callback("GET", re.compile(rf"{COMPUTE}/v2/endpoints/[^/]+/status"), callback=self._status)
        mock.add_callback("POST", re.compile(rf"{COMPUTE}/v3/endpoints/[^/]+/submit"), callback=self._submit)
        if self.amqp_publish_url is not None:
            mock.add("GET", f"{COMPUTE}/v2/get_amqp_result_connection_url", json={
                "connection_url": self.amqp_consumer_url or self.amqp_publish_url,
                "queue_prefix": RESULT_QUEUE_PREFIX,
            })

    @staticmethod
    def _reply(status: int, body: dict[str, Any]) -> tuple[int, dict[str, str], str]:
        return status, {"Content-Type": "application/json"}, json.dumps(body)

    @classmethod
    def _error(cls, status: int, code: str, message: str) -> tuple[int, dict[str, str], str]:
        return cls._reply(status, {"code": code, "message": message, "http_status_code": status})

    def _token(self, request) -> tuple[int, dict[str, str], str]:
        from urllib.parse import parse_qs

        form = {k: v[0] for k, v in parse_qs(request.body).items()}
        compute = {
            "access_token": ACCESS_TOKEN, "refresh_token": "tpm-test-refresh-token", "expires_in": 3600,
            "resource_server": "funcx_service", "scope": COMPUTE_SCOPE, "token_type": "Bearer",
        }
        if form["grant_type"] == "client_credentials":
            return self._reply(200, {**compute, "other_tokens": []})
        if form["grant_type"] == "urn:globus:auth:grant_type:dependent_token":
            granted = self.dependent_grants.get(form.get("token", ""))
            if granted is None:
                return self._error(400, "invalid_grant", "the token cannot be exchanged")
            return self._reply(200, [{**compute, "access_token": granted, "refresh_token": None}])
        if form["grant_type"] != "authorization_code" or not form.get("code"):
            return self._error(400, "invalid_grant", "no authorization code")
        return self._reply(200, {
            "access_token": "tpm-test-auth-token", "refresh_token": "tpm-test-auth-refresh", "expires_in": 3600,
            "resource_server": "auth.globus.org",
            "scope": "openid", "token_type": "Bearer", "other_tokens": [compute],
            "id_token": _signing_key().id_token(audience=form["client_id"]),
        })

    def _revoke(self, request):
        from urllib.parse import parse_qs

        self.revoked.append(parse_qs(request.body)["token"][0])
        return self._reply(200, {"active": False})

    def _authorized(self, request) -> bool:
        accepted = {ACCESS_TOKEN, *self.dependent_grants.values()}
        return request.headers.get("Authorization") in {f"Bearer {token}" for token in accepted}

    def _version(self, request):
        return self._reply(200, {"api": "1.0", "min_sdk_version": "1.0.0", "min_ep_version": "1.0.0"})

    def _register(self, request):
        if not self._authorized(request):
            return self._error(401, "UNAUTHORIZED", "no valid token")
        body = json.loads(request.body)
        function_id = str(uuid.uuid4())
        self.functions[function_id] = body
        return self._reply(200, {"function_uuid": function_id})

    def _status(self, request):
        endpoint_id = request.url.rstrip("/").split("/")[-2]
        if endpoint_id not in self.endpoints:
            return self._error(404, "ENDPOINT_NOT_FOUND", f"Endpoint {endpoint_id} not found")
        return self._reply(200, {"status": self.endpoints[endpoint_id].status, "details": {}})

    def _submit(self, request):
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task
        from globus_compute_endpoint.engines.base import GCFuture

        if not self._authorized(request):
            return self._error(401, "UNAUTHORIZED", "no valid token")
        endpoint_id = request.url.rstrip("/").split("/")[-2]
        body = json.loads(request.body)
        self.submissions.append({"endpoint_id": endpoint_id, "authorization": request.headers.get("Authorization"),
                                 **body})
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None:
            return self._error(404, "ENDPOINT_NOT_FOUND", f"Endpoint {endpoint_id} not found")
        for function_id in body["tasks"]:
            if function_id not in self.functions:
                return self._error(404, "FUNCTION_NOT_FOUND", f"Function {function_id} not found")
            if endpoint.allowed_functions is not None and function_id not in endpoint.allowed_functions:
                return self._error(403, "FUNCTION_NOT_PERMITTED",
                                   f"Function {function_id} not permitted on endpoint {endpoint_id}")
        task_group_id = body.get("task_group_id") or str(uuid.uuid4())
        results = self.result_queues.setdefault(task_group_id, queue.Queue())
        if self.amqp_publish_url is not None:
            self._declare_result_queue(task_group_id)
        task_ids: dict[str, list[str]] = {}
        for function_id, payloads in body["tasks"].items():
            code = self.functions[function_id]["function_code"]
            for payload in payloads:
                task_id = uuid.uuid4()
                task_ids.setdefault(function_id, []).append(str(task_id))
                engine_future = GCFuture(task_id)
                if self.amqp_publish_url is None:
                    engine_future.add_done_callback(lambda done, q=results: q.put(done.result()))
                else:
                    engine_future.add_done_callback(
                        lambda done, group=task_group_id: self._result_ready(group, done.result()))
                self._engine.submit(
                    engine_future,
                    messagepack.pack(Task(task_id=task_id, task_buffer=code + payload)),
                    resource_specification={},
                    # The service hands the submission's result serializers to the endpoint with the task.
                    result_serializers=body.get("result_serializers"),
                )
        return self._reply(200, {
            "request_id": str(uuid.uuid4()), "task_group_id": task_group_id,
            "endpoint_id": endpoint_id, "tasks": task_ids,
        })


    # -- results over AMQP ------------------------------------------------------

    def _amqp(self):
        import pika

        return pika.BlockingConnection(pika.URLParameters(self.amqp_publish_url))

    def _declare_result_queue(self, task_group_id: str) -> None:
        # The service makes the task group's queue when the group is created;
        # the SDK only consumes from it.
        connection = self._amqp()
        try:
            connection.channel().queue_declare(RESULT_QUEUE_PREFIX + task_group_id)
        finally:
            connection.close()

    def _result_ready(self, task_group_id: str, packed: bytes) -> None:
        with self._publish_lock:
            if self.hold_results:
                self._held.append((task_group_id, packed))
                return
        self._publish([(task_group_id, packed)])

    def held_results(self) -> int:
        with self._publish_lock:
            return len(self._held)

    def release_results(self) -> None:
        with self._publish_lock:
            held, self._held, self.hold_results = self._held, [], False
        self._publish(held)

    def _publish(self, results: list[tuple[str, bytes]]) -> None:
        import pika

        # A connection per batch: the broker may have dropped an older one on purpose.
        connection = self._amqp()
        try:
            channel = connection.channel()
            for task_group_id, packed in results:
                for _ in range(2 if self.duplicate_results else 1):
                    channel.basic_publish("", RESULT_QUEUE_PREFIX + task_group_id, packed,
                                          pika.BasicProperties(timestamp=int(time.time()), headers={}))
                    with self._publish_lock:
                        self.results_published += 1
        finally:
            connection.close()


RESULT_QUEUE_PREFIX = "tpm-test-results."


@dataclass
class _SigningKey:
    private_key: Any
    public_jwk: dict[str, Any]

    def id_token(self, audience: str) -> str:
        import jwt

        now = int(time.time())
        claims = {"iss": AUTH, "aud": audience, "sub": "5b8f2f4e-8d4c-4b7a-9a53-0e1d7c6a2b11",
                  "iat": now, "exp": now + 3600}
        return jwt.encode(claims, self.private_key, algorithm="RS512")


_KEY: list[_SigningKey] = []


def _signing_key() -> _SigningKey:
    """One RSA key per test session stands in for Globus Auth's."""
    if not _KEY:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _KEY.append(_SigningKey(private, json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))))
    return _KEY[0]


def in_process_result_watcher(service: ComputeService) -> type:
    """The SDK's ``_ResultWatcher`` with its AMQP socket replaced by ``service``'s queues."""
    import pika
    from globus_compute_sdk.sdk.executor import _ResultWatcher

    class InProcessResultWatcher(_ResultWatcher):
        def run(self) -> None:
            self._thread_id = threading.get_ident()
            tag = 0
            while not self._time_to_stop:
                messages = service.result_queues.get(str(self.task_group_id))
                while messages is not None and not messages.empty():
                    tag += 1
                    self._on_message(
                        channel=None,
                        basic_deliver=SimpleNamespace(delivery_tag=tag),
                        props=pika.BasicProperties(timestamp=int(time.time()), headers={}),
                        body=messages.get(),
                    )
                self._to_ack.clear()  # the broker's acknowledgement; nothing to send here
                if self._time_to_check_results.wait(0.01):
                    self._time_to_check_results.clear()
                    self._match_results_to_futures()

    return InProcessResultWatcher


def use_user_login(monkeypatch, user_dir: Path) -> None:
    """No service identity: a person logs in (``tpm login``) with their own token store."""
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(user_dir))
    monkeypatch.delenv("GLOBUS_COMPUTE_CLIENT_ID", raising=False)
    monkeypatch.delenv("GLOBUS_COMPUTE_CLIENT_SECRET", raising=False)
    monkeypatch.delenv("GLOBUS_SDK_ENVIRONMENT", raising=False)


def use_service_credentials(monkeypatch, user_dir: Path) -> None:
    """A service identity (client credentials) with its own token store, as CI would log in."""
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(user_dir))
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_ID", "0f5a0d4e-1a7b-4b0e-9f1d-7c7e2c2a9b10")
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_SECRET", "test-secret")
    monkeypatch.delenv("GLOBUS_SDK_ENVIRONMENT", raising=False)


@contextmanager
def answering_the_sdk(service: ComputeService, monkeypatch, user_dir: Path) -> Iterator[responses.RequestsMock]:
    """``service`` answering the SDK's HTTP calls, results over its in-process AMQP stand-in, a service
    identity logged in (token store in ``user_dir``); yields the mock, for a test's own routes."""
    import globus_compute_sdk.sdk.executor as sdk_executor

    use_service_credentials(monkeypatch, user_dir)
    monkeypatch.setattr(sdk_executor, "_ResultWatcher", in_process_result_watcher(service))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        service.install(mock)
        service.submissions.clear()
        yield mock
