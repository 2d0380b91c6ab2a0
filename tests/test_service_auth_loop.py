"""Who is calling is told on the event loop when it is known, and off it when Globus Auth must be asked.

A token the service has introspected already (or its local token) costs no hop to a worker thread;
a token it must introspect blocks on the network, in a worker thread, while every other caller goes on.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from starlette.applications import Starlette
from starlette.requests import Request

from tests.service_helpers import token_answer
from tpm_fed.service.auth import GlobusTokens, identity_of

CLIENT_ID = "5b5b1a5e-0000-4000-8000-00000000c11e"


class SlowIntrospection:
    """Globus Auth's introspection for two callers; ``slow-token``'s answer waits until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.asked: list[str] = []

    def oauth2_token_introspect(self, token: str) -> SimpleNamespace:
        self.asked.append(token)
        if token == "slow-token":
            assert self.release.wait(10)
        username = {"slow-token": "slow@anl.gov", "known-token": "ana@uchicago.edu"}[token]
        return SimpleNamespace(data=token_answer(username, CLIENT_ID))


def _request(app: Starlette, token: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": [(b"authorization", f"Bearer {token}".encode())],
                    "app": app, "query_string": b""})


def test_a_slow_introspection_holds_up_no_caller_whose_token_is_known():
    introspection = SlowIntrospection()
    app = Starlette()
    app.state.auth = GlobusTokens(CLIENT_ID, auth_client=introspection)
    app.state.auth.authenticate("known-token")  # introspected once: cached from now on

    async def both() -> tuple[str, str]:
        slow = asyncio.ensure_future(identity_of(_request(app, "slow-token")))
        await asyncio.sleep(0.05)  # the slow one is waiting on Globus Auth now
        known = await asyncio.wait_for(identity_of(_request(app, "known-token")), 5)
        assert not slow.done()
        introspection.release.set()
        return known, await asyncio.wait_for(slow, 5)

    try:
        assert asyncio.run(both()) == ("ana@uchicago.edu", "slow@anl.gov")
    finally:
        introspection.release.set()
    assert introspection.asked == ["known-token", "slow-token"]  # the known one was not asked again
