"""The broker: place a request, reserve its service units, start replicas on demand.

It joins the pure placement (:mod:`tpm_fed.broker.placement`) with what
changes at run time: the replica registry, site health, and the ledger.

Two ways in:

* :meth:`Broker.admit` reserves at once: it walks the ranked candidates and
  reserves at the first whose allocation still covers the estimate (another
  caller may have spent it since the snapshot), so a request is either placed
  with its SUs held, or refused having been charged nothing.
* :meth:`Broker.place` only places, and holds the estimate in this process's
  balance snapshot; the caller reserves a whole batch in one transaction when
  it leaves (:class:`~tpm_fed.bookkeeping.Bookkeeper`), where a request that
  lost the last SUs to another process since the snapshot is refused, charged
  nothing. This is the client's path: no database write per request.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

from tpm_fed.broker.health import SiteHealth
from tpm_fed.broker.placement import NO_BALANCE, Candidate, Decision, Placer, PlacementRequest
from tpm_fed.broker.registry import ReplicaRegistry
from tpm_fed.protocol.errors import InsufficientBalance, NotLoggedIn, NotPermitted, PlacementRefused
from tpm_fed.protocol.quotes import Quote
from tpm_fed.federation import Federation
from tpm_fed.ledger import Hold, Ledger


def _grants(federation: Federation) -> dict[tuple[str, str], float]:
    """Service units granted per (project, site), as the federation file says."""
    return {(project.name, site): amount for project in federation.projects
            for site, amount in project.allocations.items()}


def _refusal(decision: Decision) -> PlacementRefused | InsufficientBalance | NotLoggedIn:
    """The typed error for a decision that chose nothing: no balance anywhere is the caller's to fix (429);
    so are missing Globus credentials, when they were all that kept every site out."""
    if decision.refusal and decision.refusal.startswith(NO_BALANCE):
        return InsufficientBalance(f"{decision.refusal}\n{decision.explain()}")
    reasons = [c.excluded for c in decision.candidates if c.excluded]
    if reasons and all(NotLoggedIn.__name__ in reason for reason in reasons):
        why = reasons[0].split(f"{NotLoggedIn.__name__}: ", 1)[-1]
        return NotLoggedIn(f"{why}\n{decision.explain()}")
    return PlacementRefused(decision.refusal or "no candidate", decision.explain())


@dataclass(frozen=True)
class Admission:
    """A placed request: where it runs, and what was reserved for it."""

    request_id: str
    project: str
    site: str
    replica_id: str
    cold: bool
    free: bool
    estimate_usu: int
    decision: Decision
    request: PlacementRequest
    reserved: bool
    """True when the ledger holds the estimate already (:meth:`Broker.admit`); False after
    :meth:`Broker.place`, whose caller reserves it with its batch."""

    def hold(self) -> Hold:
        """The reservation this admission needs."""
        r = self.request
        return Hold(self.request_id, self.project, self.site, r.identity, r.model, r.version, r.kind,
                    self.estimate_usu, self.free)

    @property
    def replaced(self) -> str | None:
        """An idle replica stopped to make room for this one."""
        return self.decision.chosen.replaces if self.decision.chosen else None


class BalanceSnapshot:
    """Available SUs per (project, site), re-read from the ledger at most every ``max_age_s``.

    Less what this process has placed but not yet reserved (``held``): those
    estimates are in no database row yet, and a re-read must not forget them.
    Placement only ranks with it: the reservation, checked by the database,
    has the last word, so a stale figure costs at most a fall-through to the
    next candidate (:meth:`Broker.admit`) or a refused request, charged nothing
    (:meth:`Broker.place`), never an overspend.
    """

    def __init__(self, ledger: Ledger, max_age_s: float = 1.0) -> None:
        self.ledger = ledger
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._available: dict[tuple[str, str], int] = {}
        self._held: dict[tuple[str, str], int] = {}

    def refresh(self) -> None:
        fresh = {(b.project, b.site): b.available_usu for b in self.ledger.balances()}
        with self._lock:
            self._available, self._read_at = fresh, time.monotonic()

    def available(self, project: str, site: str) -> int | None:
        if time.monotonic() - self._read_at > self.max_age_s:
            self.refresh()
        key = (project, site)
        available = self._available.get(key)
        return None if available is None else available - self._held.get(key, 0)

    def spent(self, project: str, site: str, amount: int) -> None:
        """``amount`` was reserved in the ledger (mirrored here until the next re-read)."""
        with self._lock:
            key = (project, site)
            if key in self._available:
                self._available[key] -= amount

    def hold(self, project: str, site: str, amount: int) -> None:
        """``amount`` is promised to a placed request whose reservation is still to come."""
        with self._lock:
            key = (project, site)
            self._held[key] = self._held.get(key, 0) + amount

    def unhold(self, project: str, site: str, amount: int, reserved: bool) -> None:
        """The promise is over: the ledger reserved ``amount`` (``reserved``), or refused it."""
        with self._lock:
            key = (project, site)
            self._held[key] -= amount
            if reserved and key in self._available:
                self._available[key] -= amount


def _one_at_a_time(method: Callable[..., Admission]) -> Callable[..., Admission]:
    """Placements one after another: each reads the registry, then changes it. Two at once could
    both see a free slot (two cold starts on a one-replica site), or one could miss the replica
    the other just started and find the site full (a refusal with a replica starting)."""

    @functools.wraps(method)
    def serialized(self: Broker, *args: Any, **kwargs: Any) -> Admission:
        with self._placing:
            return method(self, *args, **kwargs)

    return serialized


class Broker:
    def __init__(self, federation: Federation, ledger: Ledger, registry: ReplicaRegistry,
                 health: SiteHealth | None = None) -> None:
        self._placing = threading.RLock()
        self.federation = federation
        self.ledger = ledger
        self.registry = registry
        self.health = health or SiteHealth()
        self.placer = Placer(federation)
        ledger.sync_grants(_grants(federation))
        self.balances = BalanceSnapshot(ledger)

    def use(self, federation: Federation) -> None:
        """Place against ``federation`` from now on (a changed federation file, applied while running).

        Its grants become the ledger's; a grant it no longer has becomes 0, so
        nothing more is spent there. Balances are read again at once, so a
        project granted SUs just now can spend them on its next request.
        """
        dropped = {key: 0.0 for key in _grants(self.federation)}
        self.ledger.sync_grants({**dropped, **_grants(federation)})
        self.placer = Placer(federation)
        self.federation = federation
        self.balances.refresh()

    def decide(self, request: PlacementRequest) -> Decision:
        """Rank the candidates for ``request`` (nothing is reserved or started)."""
        if request.site is not None:
            site = self.federation.site(request.site)
            if site.billing == "byo" and site.owner != request.project:
                raise NotPermitted(
                    f"site {site.name!r} is project {site.owner!r}'s own compute; "
                    f"project {request.project!r} may not use it"
                )
        return self.placer.place(
            request,
            self.registry.of_model(request.model, request.version),
            self.registry.live_per_site(),
            self.registry.evictable,
            self.balances.available,
            self.health.problem,
        )

    def quote(self, request: PlacementRequest) -> Quote:
        """Price ``request`` where it would be placed now (nothing is reserved or started).

        Raises:
            PlacementRefused, InsufficientBalance, NotLoggedIn, NotPermitted: As :meth:`admit` would.
        """
        decision = self.decide(request)
        chosen = decision.chosen
        if chosen is None:
            raise _refusal(decision)
        site = self.federation.site(chosen.site)
        worst = 0 if chosen.free else self.placer.cold_usu(request, site)
        return Quote(
            project=request.project, model=request.model, version=request.version, kind=request.kind,
            site=chosen.site, replica=chosen.replica_id, cold=chosen.replica_id is None, free=chosen.free,
            nodes=chosen.nodes,
            max_su=worst / 1e6, expected_su=chosen.cost_usu / 1e6, estimated_s=round(chosen.score_s, 3),
            explanation=decision.explain(),
        )

    @_one_at_a_time
    def admit(self, request_id: str, request: PlacementRequest) -> Admission:
        """Place ``request`` and reserve its SUs; start a replica if the best is new.

        Raises:
            PlacementRefused: No candidate is eligible (with the explanation).
            InsufficientBalance: Every candidate's reservation failed.
            NotPermitted: The request names another project's own site.
        """
        decision = self.decide(request)
        if decision.chosen is None:
            raise _refusal(decision)
        last_error: InsufficientBalance | None = None
        for candidate in decision.ranked:
            try:
                self.ledger.reserve(
                    request_id, project=request.project, site=candidate.site, identity=request.identity,
                    model=request.model, version=request.version, kind=request.kind,
                    estimate_usu=candidate.cost_usu, free=candidate.free,
                )
            except InsufficientBalance as error:
                last_error = error
                self.balances.refresh()
                continue
            self.balances.spent(request.project, candidate.site, candidate.cost_usu)
            return self._take(request_id, request, candidate, decision, reserved=True)
        assert last_error is not None
        raise last_error

    @_one_at_a_time
    def place(self, request_id: str, request: PlacementRequest) -> Admission:
        """Place ``request`` without writing to the ledger: its caller reserves it with its batch.

        The estimate is held in the balance snapshot until :meth:`reserved` says
        how the reservation went, so this process never places more than it has.

        Raises:
            PlacementRefused: No candidate is eligible (with the explanation).
            NotPermitted: The request names another project's own site.
        """
        decision = self.decide(request)
        if decision.chosen is None:
            raise _refusal(decision)
        candidate = decision.chosen
        self.balances.hold(request.project, candidate.site, candidate.cost_usu)
        return self._take(request_id, request, candidate, decision, reserved=False)

    def reserved(self, admissions: list[Admission], refused: Collection[str]) -> None:
        """The batch reservation of placed requests is over; ``refused`` names those it refused.

        Refused requests leave their replica's queue (they will not run).
        """
        for admission in admissions:
            ok = admission.request_id not in refused
            self.balances.unhold(admission.project, admission.site, admission.estimate_usu, reserved=ok)
            if not ok:
                self.registry.failed(admission.replica_id, 1)

    @_one_at_a_time
    def move(self, admission: Admission, replica_id: str) -> Admission | None:
        """Place again, on live replica ``replica_id`` of the same model version, a request that was placed but
        not reserved (it still waits in its replica's queue): a sibling replica with a free worker takes it
        (work stealing at a batch's end). Its hold moves with it; the estimate is the new site's.

        Returns None where the request may not go there (its caller named its site, it runs the caller's code,
        a site it may not use, no balance there, the replica stopped): it then stays where it was, unchanged.
        """
        target = self.registry.get(replica_id)
        if (admission.reserved or admission.request.site is not None or admission.request.own_site_only
                or target is None or not target.live or target.replica_id == admission.replica_id):
            return None
        decision = self.decide(replace(admission.request, site=target.site))
        chosen = next((c for c in decision.ranked if c.replica_id == replica_id), None)
        if chosen is None:
            return None
        self.balances.unhold(admission.project, admission.site, admission.estimate_usu, reserved=False)
        self.balances.hold(admission.project, chosen.site, chosen.cost_usu)
        self.registry.failed(admission.replica_id, 1)  # it leaves that queue
        self.registry.queued(replica_id)
        return Admission(admission.request_id, admission.project, chosen.site, replica_id, False, chosen.free,
                         chosen.cost_usu, Decision(chosen, decision.candidates), admission.request, False)

    def replica_lost(self, replica_id: str, requests: int) -> None:
        """A task of ``replica_id`` was lost with ``requests`` that will be placed again: it is stopped.

        Its worker, and the model it held, are gone; call this once per lost
        task, before :meth:`replace_lost` places its requests again.
        """
        self.registry.failed(replica_id, requests)
        replica = self.registry.get(replica_id)
        if replica is not None and replica.live:
            self.registry.set_state([replica_id], "stopped")

    @_one_at_a_time
    def replace_lost(self, lost: Admission) -> Admission:
        """Place again a request whose task was lost (see :meth:`replica_lost`); its reservation goes with it.

        The request goes to another replica or a new one. On the same site the
        reservation stays as it is; on another it moves there (one
        transaction: :meth:`Ledger.move_reservation`). The estimate stays the
        first placement's, so the caller never pays for the restart.

        Raises:
            PlacementRefused: No candidate is eligible (with the explanation).
            InsufficientBalance: No other site's allocation covers the estimate.
        """
        decision = self.decide(lost.request)
        if decision.chosen is None:
            raise _refusal(decision)
        last_error: InsufficientBalance | None = None
        for candidate in decision.ranked:
            estimate = 0 if candidate.free else (candidate.cost_usu if lost.free else lost.estimate_usu)
            if candidate.site != lost.site:
                try:
                    self.ledger.move_reservation(lost.request_id, lost.site, candidate.site, estimate, candidate.free)
                except InsufficientBalance as error:
                    last_error = error
                    continue
            else:
                estimate = lost.estimate_usu
            candidate = replace(candidate, cost_usu=estimate)
            return self._take(lost.request_id, lost.request, candidate, decision, reserved=True)
        assert last_error is not None
        raise last_error

    def _take(self, request_id: str, request: PlacementRequest, candidate: Candidate, decision: Decision,
              *, reserved: bool) -> Admission:
        if candidate.replaces is not None:
            self.registry.set_state([candidate.replaces], "stopped")
        replica = self._replica_for(candidate, request)
        self.registry.queued(replica.replica_id)
        return Admission(request_id, request.project, candidate.site, replica.replica_id,
                         candidate.replica_id is None, candidate.free, candidate.cost_usu,
                         Decision(candidate, decision.candidates), request, reserved)

    def _replica_for(self, candidate: Candidate, request: PlacementRequest):
        if candidate.replica_id is not None:
            existing = self.registry.get(candidate.replica_id)
            if existing is not None and existing.live:
                return existing
        return self.registry.start(candidate.site, request.model, request.version, request.backend)

    def reap_idle(self, now: float | None = None) -> list[str]:
        """Stop replicas idle past their site's keep-alive; returns their ids."""
        now = time.time() if now is None else now
        cutoffs = {s.name: now - s.keep_alive_s for s in self.federation.sites}
        idle = [r.replica_id for r in self.registry.idle_since(cutoffs)]
        self.registry.set_state(idle, "draining")
        self.registry.set_state(idle, "stopped")
        return idle
