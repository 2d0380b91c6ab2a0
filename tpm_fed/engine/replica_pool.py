"""The replicas' dispatchers and the sites they run on: made on first use, rerouted, reaped, retired.

One dispatcher per replica (per replica and caller for a bring-your-own
Globus Compute site, whose tasks must run under the caller's own identity).
Every request reaches a dispatcher through :meth:`ReplicaPool.submit`: one
its dispatcher reports lost with its task is placed again here, above the
dispatchers (as Parsl retries above its executors): once, never one whose
caller named the site, keeping its reservation. Sites start on first use and stay up,
with their warm replicas, until :meth:`ReplicaPool.close`; a site a
federation change stopped finishes its work first (:meth:`ReplicaPool.retire`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from typing import Any

from tpm_fed.bookkeeping import Bookkeeper
from tpm_fed.broker import Admission, Broker
from tpm_fed.engine.dispatcher import ReplicaDispatcher
from tpm_fed.engine.interface import TaskChannels
from tpm_fed.engine.pending import Pending, pass_on, resolve
from tpm_fed.federation import Federation, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.protocol.code_version import serving_code_version
from tpm_fed.protocol.errors import SiteError, TpmError
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult
from tpm_fed.sites import Site, SiteStatus, build_site
from tpm_fed.sites.globus_compute import GlobusComputeSite
from tpm_fed.sites.local import model_roots_of
from tpm_fed.state import RequestLog

logger = logging.getLogger(__name__)


class ReplicaPool:
    """Dispatchers keyed by replica (and caller), and the sites they send to.

    Args:
        federation: The federation served now (it changes while the engine runs).
        compute_client_as: A Globus Compute client factory acting as an identity (None: none for them).
        channels: The service's back channel (None: in-process only).
    """

    def __init__(self, home: TpmHome, federation: Callable[[], Federation], broker: Broker,
                 bookkeeper: Bookkeeper, log: RequestLog, compute_client_as: Callable[[str], Any],
                 channels: TaskChannels | None) -> None:
        self.home, self._federation, self.broker, self.log = home, federation, broker, log
        self._bookkeeper, self._compute_client_as, self._channels = bookkeeper, compute_client_as, channels
        self.sites: dict[str, Site] = {}
        self._dispatchers: dict[str, ReplicaDispatcher] = {}
        # Sites reached as the caller (byo Globus Compute): one site and dispatcher per caller.
        self._sites_as_caller: dict[tuple[str, str], tuple[SiteConfig, Site]] = {}  # (site, identity) -> made from
        self._dispatchers_as_caller: dict[tuple[str, str], ReplicaDispatcher] = {}
        self._replaced_as_caller: list[Site] = []
        self._retiring: list[Site] = []  # stopped sites finishing the work they had
        self._retried: set[str] = set()  # requests on their second try after a lost task
        self._bursts = 0  # callers placing a burst of requests that should leave together (see burst)
        self._lock = threading.Lock()
        self.closed = False

    def dispatcher(self, admission: Admission, spec: ModelSpec) -> ReplicaDispatcher:
        """The dispatcher of the replica ``admission`` placed its request on (stopped replicas forgotten)."""
        self.forget([admission.replaced] if admission.replaced else [])
        config, identity = self._federation().site(admission.site), admission.request.identity
        as_caller = self.client_as_caller(config, identity)
        with self._lock:
            if as_caller is not None:
                # Reached as the caller: a batch is one caller's, so their tasks run under their account.
                key = (admission.replica_id, identity)
                if key not in self._dispatchers_as_caller:
                    site = self._site_as_caller(config, identity, as_caller)
                    self._dispatchers_as_caller[key] = self._new_dispatcher(site, config, spec)
                return self._dispatchers_as_caller[key]
            if admission.replica_id not in self._dispatchers:
                self._dispatchers[admission.replica_id] = self._new_dispatcher(self._site(config), config, spec)
            return self._dispatchers[admission.replica_id]

    def made_dispatcher(self, admission: Admission) -> ReplicaDispatcher | None:
        """The dispatcher of ``admission``'s replica if it exists already and nothing must be stopped or
        started to use it (None: ask :meth:`dispatcher`, which may start a site)."""
        if admission.replaced:
            return None
        with self._lock:
            found = self._dispatchers.get(admission.replica_id) or self._dispatchers_as_caller.get(
                (admission.replica_id, admission.request.identity))
        return found

    def client_as_caller(self, config: SiteConfig, identity: str | None) -> Callable[[], Any] | None:
        """A Globus Compute client factory acting as ``identity``, for a byo site reached through Globus
        Compute (a byo endpoint maps the submitting identity to an account on the owner's allocation).
        Shared (rcc) sites, and callers with local identities, use the service's own credentials."""
        if identity is None or config.billing != "byo" or config.access != "globus-compute":
            return None
        return self._compute_client_as(identity)

    def _site_as_caller(self, config: SiteConfig, identity: str, client_factory: Callable[[], Any]) -> Site:
        """Called under the lock: ``identity``'s own connection to a byo Globus Compute site."""
        key = (config.name, identity)
        made = self._sites_as_caller.get(key)
        if made is not None and made[0] == config:
            return made[1]
        if made is not None:
            self._replaced_as_caller.append(made[1])  # its entry changed: its tasks finish, close() stops it
        site = GlobusComputeSite(config, client_factory=client_factory)
        self._sites_as_caller[key] = (config, site)
        return site

    def _new_dispatcher(self, site: Site, config: SiteConfig, spec: ModelSpec) -> ReplicaDispatcher:
        return ReplicaDispatcher(
            site, spec, max_batch=config.max_batch_requests, max_in_flight=config.capacity.max_replicas,
            linger_s=config.batch_linger_ms / 1000, task_timeout_s=config.task_timeout_s,
            join_for_s=min(config.join_for_s, config.task_timeout_s / 4), recorder=self._bookkeeper,
            # Only what the worker checks: permissions are its endpoint's policy, never a task's.
            context={"code_version": serving_code_version()},
            lost_goes_up=True, channels=self._channels, held=lambda: self._bursts > 0, borrow=self._borrow)

    def _borrow(self, thief: ReplicaDispatcher, room: int) -> list[Pending]:
        """Up to ``room`` batch lines waiting for busy siblings of ``thief`` (replicas of its model version), placed
        again on ``thief``'s replica: the longest queue lends first. A line the broker will not move there (its
        caller named its site, no balance there...) goes back to its queue, unchanged."""
        with self._lock:
            thief_id = next((rid for rid, d in self._dispatchers.items() if d is thief), None)
            siblings = sorted(((rid, d) for rid, d in self._dispatchers.items()
                               if d is not thief and d.spec.version == thief.spec.version
                               and d.spec.name == thief.spec.name), key=lambda item: -item[1].waiting)
        taken: list[Pending] = []
        for _, sibling in ([] if thief_id is None else siblings):
            if len(taken) >= room:
                break
            staying = []
            for pending in sibling.lend(room - len(taken)):
                try:
                    admission = self._bookkeeper.admission_of(pending.request_id)
                    moved = self.broker.move(admission, thief_id) if admission is not None else None
                except Exception:  # it stays where it was placed
                    logger.exception("could not move request %s to replica %s", pending.request_id, thief_id)
                    moved = None
                if moved is None:
                    staying.append(pending)
                else:
                    self._bookkeeper.moved(moved)
                    taken.append(pending)
            sibling.adopt(staying)
        return taken

    def forget(self, replica_ids: list[str]) -> None:
        """Stopped replicas get no more work; their worker frees them on its next load."""
        with self._lock:
            for replica_id in replica_ids:
                self._dispatchers.pop(replica_id, None)
            for key in [k for k in self._dispatchers_as_caller if k[0] in replica_ids]:
                del self._dispatchers_as_caller[key]

    def _site(self, config: SiteConfig) -> Site:
        """Called under the lock."""
        if config.name not in self.sites:
            self.sites[config.name] = build_site(config, self.home.sites_dir,
                                                 model_roots=model_roots_of(self._federation(), self.home.models_dir))
        return self.sites[config.name]

    def site(self, name: str | None = None) -> Site:
        """A site of the federation (started on first use)."""
        federation = self._federation()
        config = federation.site(name) if name else federation.sites[0]
        with self._lock:
            return self._site(config)

    @contextmanager
    def burst(self) -> Iterator[None]:
        """Requests submitted inside leave together once the block ends (see ``Engine.burst``)."""
        with self._lock:
            self._bursts += 1
        try:
            yield
        finally:
            with self._lock:
                self._bursts -= 1
                dispatchers = [*self._dispatchers.values(), *self._dispatchers_as_caller.values()]
            for dispatcher in dispatchers:
                dispatcher.nudge()

    def submit(self, dispatcher: ReplicaDispatcher, request: ServingRequest, nbytes: int | None = None, *,
               background: bool = False, send_on: Executor | None = None) -> Future[ServedResult]:
        """Hand ``request`` to ``dispatcher`` (one this pool made); the caller's future. A request the
        dispatcher reports lost with its site (its future fails with the site error, unsettled) is placed
        again here (:meth:`_ended`)."""
        caller: Future[ServedResult] = Future()
        sent = dispatcher.submit(request, nbytes, background=background, send_on=send_on)
        sent.add_done_callback(lambda done: self._ended(done, caller, request, dispatcher.spec, background))
        return caller

    def _ended(self, done: Future[ServedResult], caller: Future[ServedResult], request: ServingRequest,
               spec: ModelSpec, background: bool) -> None:
        """Pass a dispatcher's outcome on; place a request lost with its site once more, or settle it lost."""
        error = None if done.cancelled() else done.exception()
        lost = self._bookkeeper.admission_of(request.request_id) if isinstance(error, SiteError) else None
        if lost is None:  # served, failed otherwise, or settled already
            pass_on(done, caller)
            return
        try:
            second_try = self._second_try(request, lost, spec, background, caller)
        except Exception:  # the first failure stands
            logger.exception("could not place request %s, lost with its task, again", request.request_id)
            second_try = None
        if second_try is None:
            resolve(caller, self._settle_lost(request, error))
            return
        second_try.add_done_callback(lambda again: pass_on(again, caller))

    def _second_try(self, request: ServingRequest, first: Admission, spec: ModelSpec, background: bool,
                    caller: Future[ServedResult]) -> Future[ServedResult] | None:
        """Place a request lost with its task once more, keeping its reservation (charged once, at most its
        first estimate; see :meth:`Broker.replace_lost`). None: it may not move (its caller named the site,
        or left, or this is its second try already) or no other replica takes it."""
        with self._lock:
            if request.site is not None or self.closed or caller.done() or request.request_id in self._retried:
                return None
            self._retried.add(request.request_id)
        try:
            self.broker.replica_lost(first.replica_id, 1)
            admission = self.broker.replace_lost(first)
        except TpmError as why:
            logger.warning("request %s, lost with its task, could not be placed again: %s", request.request_id, why)
            with self._lock:
                self._retried.discard(request.request_id)
            return None
        self._bookkeeper.replaced(admission)
        second_try = self.submit(self.dispatcher(admission, spec), request, background=background)
        second_try.add_done_callback(lambda _: self._retried.discard(request.request_id))
        return second_try

    def _settle_lost(self, request: ServingRequest, error: BaseException) -> BaseException:
        """Record a lost request's failure (released, not charged); the error its caller gets."""
        try:
            return self._bookkeeper.record_outcomes({request.request_id: error})[request.request_id]
        except Exception:  # a bookkeeping failure must not hang the caller (the sweeper releases it later)
            logger.exception("could not record the loss of request %s", request.request_id)
            return error

    def dispatcher_of(self, admission: Admission) -> ReplicaDispatcher | None:
        """The dispatcher holding ``admission``'s request, if one was made."""
        with self._lock:
            return self._dispatchers.get(admission.replica_id) or self._dispatchers_as_caller.get(
                (admission.replica_id, admission.request.identity))

    def waiting_per_replica(self) -> dict[str, int]:
        """Requests admitted to each replica that no task carries yet."""
        with self._lock:
            dispatchers = [*self._dispatchers.items(), *((key[0], d) for key, d in self._dispatchers_as_caller.items())]
        waiting: dict[str, int] = {}
        for replica_id, dispatcher in dispatchers:
            waiting[replica_id] = waiting.get(replica_id, 0) + dispatcher.waiting
        return waiting

    def status(self) -> list[SiteStatus]:
        with self._lock:
            started = dict(self.sites)
        return [started[c.name].status() if c.name in started
                else SiteStatus(c.name, c.access, "stopped", c.capacity.max_replicas, 0)
                for c in self._federation().sites]

    def stop_sites(self, names: set[str], replica_ids: list[str]) -> None:
        """A federation change stopped sites ``names`` (replicas ``replica_ids``): no new work reaches
        them; each shuts down once its work is done (in a thread of its own)."""
        with self._lock:
            for replica_id in replica_ids:
                self._dispatchers.pop(replica_id, None)
            for key in [k for k in self._dispatchers_as_caller if k[0] in replica_ids]:
                del self._dispatchers_as_caller[key]  # their sites are rebuilt when their config changed
            retired = [self.sites.pop(name) for name in sorted(names) if name in self.sites]
            self._retiring.extend(retired)
        for site in retired:
            threading.Thread(target=self.retire, args=(site, replica_ids), name=f"tpm-retire-{site.name}",
                             daemon=True).start()

    def retire(self, site: Site, replica_ids: list[str], grace_s: float = 900.0) -> None:
        """Stop ``site`` once its tasks and its replicas' queued requests are done (or after ``grace_s``)."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not self.closed:
            queued = sum(r.queue_depth for r in map(self.broker.registry.get, replica_ids)
                         if r is not None and r.site == site.name)
            if not queued and not site.status().outstanding_tasks:
                break
            time.sleep(0.1)
        with self._lock:
            if site not in self._retiring:  # close() stopped it already
                return
            self._retiring.remove(site)
        site.shutdown()
        self.log.site_stopped(site.name)

    def close(self) -> None:
        """Stop every site this pool started; their replicas go with them."""
        with self._lock:
            self.closed = True
            sites, self.sites = self.sites, {}
            retiring, self._retiring = self._retiring, []
            self._dispatchers.clear()
            as_caller = [site for _, site in self._sites_as_caller.values()] + self._replaced_as_caller
            self._sites_as_caller.clear()
            self._dispatchers_as_caller.clear()
        for site in [*as_caller, *retiring]:
            site.shutdown()
        for name, site in sites.items():
            site.shutdown()
            self.log.site_stopped(name)
            self.broker.registry.set_state(
                [r.replica_id for r in self.broker.registry.all() if r.site == name and r.live], "stopped")
