"""Who is calling: a bearer token in, an identity (the name project member lists use) out.

Two modes, one small protocol:

- ``local``: the embedded default. The service makes a random token and
  writes it to ``$TPM_HOME/service.json`` (mode 0600, listening on loopback),
  so whoever can read the home is its owner, as Jupyter does.
- ``globus``: a shared deployment. Callers send Globus Auth access tokens
  issued for the service's scope; the service introspects each with its own
  confidential client (globus-sdk), checks it is active, unexpired and meant
  for this service (audience), and caches the answer until the token expires.
  A refusal is cached too, for :data:`REFUSAL_CACHE_S` (at most
  :data:`CACHED_TOKENS` tokens of each kind, the oldest forgotten first), so
  a client retrying a bad token does not cost an introspection per request,
  and Globus Auth does not rate-limit the service for it.
  The identity is the token's Globus username (``ana@uchicago.edu``).
  Each accepted token is remembered for its identity, so the service can
  act for the caller elsewhere (their Globus Groups, a bring-your-own
  Globus Compute site) with dependent tokens; see
  :mod:`tpm_fed.service.callers`.

Either mode tells, unauthenticated, how to log in to it
(:meth:`Authenticator.login_info`, served at ``GET /tpm/v1/auth``).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from tpm_fed.protocol.errors import Unauthenticated

REFUSAL_CACHE_S = 60.0
"""How long a token Globus Auth refused stays refused without asking again (a revoked token is refused
at once; a newly issued one is a new token)."""

CACHED_TOKENS = 10_000
"""Most tokens remembered, accepted and refused each: the caches' memory is bounded whatever callers send."""


class Authenticator(Protocol):
    """Turns the ``Authorization`` header's bearer token into an identity."""

    mode: str

    def authenticate(self, token: str | None) -> str:
        """The caller's identity.

        Raises:
            Unauthenticated: No token, or one this service does not accept.
        """
        ...

    def known(self, token: str | None) -> str | None:
        """The caller's identity when it is known without asking anyone (a local token, a cached answer),
        None when only :meth:`authenticate` can tell (it may block on the network).

        Raises:
            Unauthenticated: As :meth:`authenticate`, for a token known to be refused.
        """
        ...

    def login_info(self) -> dict[str, Any]:
        """What a client needs to log in to this service (public: no secret in it)."""
        ...


async def identity_of(request: Request) -> str:
    """The caller of an HTTP request, from its bearer token (the routes' FastAPI dependency).

    On the event loop when the answer is known (a sync dependency would cost every request a hop to a
    worker thread and back); in a worker thread when the authenticator must ask (Globus Auth's
    introspection blocks on the network)."""
    auth = request.app.state.auth
    token = bearer_token(request.headers.get("authorization"))
    identity = auth.known(token)
    if identity is not None:
        return identity
    return await run_in_threadpool(auth.authenticate, token)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (None when absent or malformed)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class LocalToken:
    """One token, one identity: the home's owner."""

    token: str
    identity: str
    mode: str = "local"

    def authenticate(self, token: str | None) -> str:
        if token is None:
            raise Unauthenticated("no bearer token: send the token from $TPM_HOME/service.json "
                                  "(tpm service status prints it)")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise Unauthenticated("the bearer token is not this service's token")
        return self.identity

    def known(self, token: str | None) -> str:
        return self.authenticate(token)  # one comparison: never blocks

    def login_info(self) -> dict[str, Any]:
        return {"mode": self.mode}


class GlobusTokens:
    """Globus Auth access tokens, introspected by the service's own confidential client.

    Args:
        client_id: The service's Globus Auth client id (also the audience tokens must name).
        client_secret: Its secret.
        auth_client: A ``globus_sdk.ConfidentialAppAuthClient`` (made from the two above by default).
        audience: The resource server tokens must be issued for (the client id by default).
        login_client_id: The native app client users log in with (``tpm login``); the
            service only advertises it.
        scope: The scope users log in for (``https://auth.globus.org/scopes/CLIENT_ID/all`` by default).
    """

    mode = "globus"

    def __init__(self, client_id: str, client_secret: str | None = None, *, auth_client: Any = None,
                 audience: str | None = None, login_client_id: str | None = None,
                 scope: str | None = None) -> None:
        from tpm_fed.service.dependent_tokens import DependentTokens

        if auth_client is None:
            import globus_sdk

            auth_client = globus_sdk.ConfidentialAppAuthClient(client_id, client_secret)
        self.auth_client = auth_client
        self.audience = audience or client_id
        self.login_client_id = login_client_id
        self.scope = scope or f"https://auth.globus.org/scopes/{self.audience}/all"
        self.dependent_tokens = DependentTokens(auth_client)
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._refused: OrderedDict[str, tuple[str, float]] = OrderedDict()  # hash -> (why, until)
        self._lock = threading.Lock()

    def login_info(self) -> dict[str, Any]:
        return {"mode": self.mode, "client_id": self.login_client_id, "scope": self.scope,
                "resource_server": self.audience}

    def known(self, token: str | None) -> str | None:
        if token is None:
            raise Unauthenticated("no bearer token: run `tpm login` for a Globus Auth token for this service")
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        with self._lock:
            cached, refused = self._cache.get(key), self._refused.get(key)
        if cached is not None and cached[1] > now:
            self.dependent_tokens.remember(cached[0], token, cached[1])
            return cached[0]
        if refused is not None and refused[1] > now:
            raise Unauthenticated(refused[0])
        return None

    def authenticate(self, token: str | None) -> str:
        identity = self.known(token)
        if identity is not None:
            return identity
        assert token is not None  # known() refused a missing one
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        try:
            identity, expires = self._introspect(token, now)
        except _Refused as refusal:  # Globus Auth's answer about this token: the same for a while
            with self._lock:
                _remember(self._refused, key, (str(refusal), now + REFUSAL_CACHE_S), now)
            raise Unauthenticated(str(refusal)) from None
        with self._lock:
            _remember(self._cache, key, (identity, expires), now)
        self.dependent_tokens.remember(identity, token, expires)
        return identity

    def _introspect(self, token: str, now: float) -> tuple[str, float]:
        import globus_sdk

        try:
            answer = self.auth_client.oauth2_token_introspect(token).data
        except globus_sdk.GlobusAPIError as error:
            raise Unauthenticated(f"Globus Auth refused to introspect the token ({error.http_status})") from None
        except globus_sdk.NetworkError as error:
            raise Unauthenticated(f"Globus Auth could not be reached to check the token: {error}") from None
        if not answer.get("active"):
            raise _Refused("the token is not active (expired or revoked): run `tpm login`")
        expires = float(answer.get("exp") or 0)
        if expires <= now:
            raise _Refused("the token has expired: run `tpm login`")
        audiences = answer.get("aud") or []
        if self.audience not in audiences:
            raise _Refused("the token was issued for another service, not this one")
        username = answer.get("username")
        if not username:
            raise _Refused("the token names no identity")
        return str(username), expires


class _Refused(Unauthenticated):
    """Globus Auth answered, and the token is not one this service accepts (inactive, expired, another
    audience, no identity): cached as refused. Not reaching Globus Auth is not this (it is not cached)."""


def _remember(cache: OrderedDict, key: str, value: tuple[str, float], now: float) -> None:
    """Keep ``value`` under ``key``; drop expired entries, then the oldest, to stay within CACHED_TOKENS."""
    cache[key] = value
    cache.move_to_end(key)
    while cache and (len(cache) > CACHED_TOKENS or next(iter(cache.values()))[1] <= now):
        cache.popitem(last=False)
