"""Defect 2: a caller's ``Host`` header never decides where a task's back channel goes.

The back channel carries a task's secret, its requests' ids and their text.
It used to go to the URL of the first streamed request's ``Host``: a caller
naming ``127.0.0.1:PORT``, with their own listener on PORT, received another
user's stream and could rewrite it. Now the service refuses a ``Host`` it
does not serve, gives every task its own bound URL whatever the request
says, and a worker sends only to an origin (scheme, host and port) its
endpoint lists.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from functions.policy import WorkerPolicy, load_policy
from functions.back_channel import BackChannel
from tpm_fed.protocol.errors import SiteError

STREAMED = {"model": "demo-llama", "prompt": "The river carries", "max_tokens": 8, "min_tokens": 8,
            "temperature": 0, "stream": True}


class Listener:
    """An attacker's HTTP listener on loopback: records every request it gets, answers as the service would."""

    def __init__(self) -> None:
        heard = self.heard = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                heard.append((self.path, self.rfile.read(int(self.headers.get("Content-Length") or 0))))
                body = json.dumps({"delivered": 0, "cancelled": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]

    def __enter__(self) -> Listener:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()


def stream(service, host: str) -> tuple[int, str]:
    """The answer's status and what arrived of its body (a stream may be cut)."""
    received = []
    with httpx.stream("POST", f"{service.url}/v1/completions", json=STREAMED, timeout=120,
                      headers={**service.headers, "Host": host}) as answer:
        try:
            received.extend(answer.iter_text())
        except httpx.RemoteProtocolError:
            pass
        return answer.status_code, "".join(received)


def test_a_host_naming_a_callers_listener_is_refused_and_the_listener_hears_nothing(service):
    with Listener() as attacker:
        status, body = stream(service, f"127.0.0.1:{attacker.port}")
    assert attacker.heard == []  # no secret, no request id, no text
    assert status == 400, body
    assert json.loads(body)["error"]["code"] == "InvalidHost"


def test_an_alias_the_service_serves_still_gets_the_services_own_back_channel(service, runtime, monkeypatch):
    hub = runtime.channels
    opened, channels = hub.open, []

    def recorded(request_ids, joins=None):
        channel = opened(request_ids, joins)
        channels.append(channel)
        return channel

    monkeypatch.setattr(hub, "open", recorded)
    port = service.url.rsplit(":", 1)[1]
    status, body = stream(service, f"localhost:{port}")  # loopback, the bound port: served
    assert status == 200 and body.rstrip().endswith("data: [DONE]"), body
    urls = {channel["url"] for channel in channels if channel}
    assert urls == {f"{service.url}/tpm/v1/channel"}  # the bound address, not the name the caller used


def test_a_worker_sends_only_to_the_listed_origin_not_another_port_of_its_host():
    policy = WorkerPolicy(stream_hosts=["http://127.0.0.1:8321"])

    def channel(url: str) -> BackChannel | None:
        return BackChannel.for_task({"stream": {"url": url, "token": "t"}}, policy)

    listed = channel("http://127.0.0.1:8321/tpm/v1/channel")
    assert listed is not None
    listed.close()
    assert channel("http://127.0.0.1:8322/tpm/v1/channel") is None  # right host, another port
    assert channel("https://127.0.0.1:8321/tpm/v1/channel") is None  # another scheme
    assert channel("http://localhost:8321/tpm/v1/channel") is None  # another host name
    assert WorkerPolicy().may_stream_to("http://127.0.0.1:8321/tpm/v1/channel") is False  # loopback is not implied
    assert WorkerPolicy(stream_loopback=True).may_stream_to("http://127.0.0.1:8321/tpm/v1/channel")


def test_a_bare_host_in_the_endpoint_policy_is_refused_as_ambiguous():
    with pytest.raises(SiteError, match="scheme, host and port"):
        load_policy({"TPM_STREAM_HOSTS": "tpm.center.edu"})
    policy = load_policy({"TPM_STREAM_HOSTS": "https://tpm.center.edu, http://10.0.0.5:8321"})
    assert policy.stream_hosts == ["https://tpm.center.edu:443", "http://10.0.0.5:8321"]
