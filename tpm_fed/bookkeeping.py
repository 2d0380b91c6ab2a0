"""Everything written about a batch when it leaves and when it comes back.

The dispatcher calls this twice per batch, and each call is one database
transaction for the whole batch:

* when it leaves (:meth:`Bookkeeper.record_sent`): the service units of
  every request placed by :meth:`~tpm_fed.broker.Broker.place` are reserved,
  and the request log records the batch as queued. A request whose
  reservation is refused (another process spent the SUs since the balance
  snapshot) is left out of the task and fails, charged nothing;
* when it comes back (:meth:`Bookkeeper.record_outcomes`, before any
  caller's future resolves): the request log, the ledger (settle what
  succeeded, release what failed) and the replica's row; then the replica
  registry and site health in memory. Results come back annotated with their
  charge and placement.

Nothing is written per request on the submitting thread.
"""

from __future__ import annotations

import threading

from sqlalchemy.exc import IntegrityError

from tpm_fed.broker import Admission, Broker
from tpm_fed.protocol.errors import InvalidRequest, SiteError
from tpm_fed.federation import Price
from tpm_fed.ledger import Metered, price_usu
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ChargeInfo, ServedResult
from tpm_fed.state import RequestLog
from tpm_fed.state.schema import MICRO


class Bookkeeper:
    def __init__(self, log: RequestLog, broker: Broker) -> None:
        if log.engine is not broker.ledger.engine:
            raise ValueError("the request log and the ledger must share one database (one transaction per batch)")
        self.log = log
        self.broker = broker
        self._admissions: dict[str, tuple[Admission, Price]] = {}
        self._lock = threading.Lock()

    def admitted(self, admission: Admission, price: Price) -> None:
        """Remember a placed request until its outcome is recorded.

        Raises:
            InvalidRequest: A request with this id is in flight already (its placement is undone).
        """
        with self._lock:
            duplicate = admission.request_id in self._admissions
            if not duplicate:
                self._admissions[admission.request_id] = (admission, price)
        if duplicate:
            if not admission.reserved:
                self.broker.reserved([admission], refused={admission.request_id})
            raise InvalidRequest(f"request {admission.request_id} is in flight already")

    def forget(self, admission: Admission) -> None:
        """A placed request that will not be sent after all: its hold (or reservation) goes back."""
        with self._lock:
            self._admissions.pop(admission.request_id, None)
        if admission.reserved:
            self.broker.ledger.release(admission.request_id, "not sent")
            self.broker.registry.failed(admission.replica_id, 1)
        else:
            self.broker.reserved([admission], refused={admission.request_id})

    def record_sent(self, site: str, version: str, requests: list[ServingRequest]) -> dict[str, BaseException]:
        """Reserve the batch's service units and log it as queued, in one transaction.

        Returns:
            The requests refused (not to be sent), with why; nothing was charged for them.
        """
        with self._lock:
            pending = [self._admissions[r.request_id][0] for r in requests if r.request_id in self._admissions]
        to_reserve = [a for a in pending if not a.reserved]
        try:
            refused = self._reserve_and_log(site, version, requests, to_reserve)
        except BaseException:  # nothing was reserved; the batch fails and its outcomes say so
            for a in to_reserve:
                self.broker.balances.unhold(a.project, a.site, a.estimate_usu, reserved=False)
            raise
        self.broker.reserved(to_reserve, refused)
        if refused:
            with self._lock:
                for request_id in refused:
                    self._admissions.pop(request_id, None)
        return refused

    def _reserve_and_log(self, site, version, requests, to_reserve) -> dict[str, BaseException]:
        def once(look_first: bool) -> dict[str, BaseException]:
            with self.log.engine.begin() as db:
                refused = self.broker.ledger.reserve_many([a.hold() for a in to_reserve], db, look_first=look_first)
                self.log.record_sent(site, version, [r for r in requests if r.request_id not in refused], db)
            return refused

        try:
            return once(look_first=False)
        except IntegrityError:  # an id was charged or logged already: again, looking first
            return once(look_first=True)

    def record_outcomes(
        self, outcomes: dict[str, ServedResult | BaseException]
    ) -> dict[str, ServedResult | BaseException]:
        """Log, settle or release, and update the replica: one transaction for the batch."""
        with self._lock:
            admitted = {rid: self._admissions.pop(rid) for rid in outcomes if rid in self._admissions}
        settle, release = [], []
        for request_id, outcome in outcomes.items():
            if request_id not in admitted:
                continue
            admission, price = admitted[request_id]
            if isinstance(outcome, ServedResult):
                used = Metered(outcome.usage.prompt_tokens, outcome.usage.completion_tokens,
                               outcome.usage.activation_bytes, cold_start=not outcome.replica.warm)
                settle.append((request_id, used, price_usu(price, used)))
            else:
                release.append((request_id, f"{type(outcome).__name__}: {outcome}"))
        with self.log.engine.begin() as db:
            self.log.record_outcomes(outcomes, db)
            charged = self.broker.ledger.settle_many(settle, db)
            self.broker.ledger.release_many(release, db)
            self._update_replicas(outcomes, admitted, db)

        annotated: dict[str, ServedResult | BaseException] = {}
        for request_id, outcome in outcomes.items():
            if isinstance(outcome, ServedResult) and request_id in admitted:
                admission, _ = admitted[request_id]
                outcome = outcome.model_copy(update={
                    "charge": ChargeInfo(
                        project=admission.project, charged_su=charged.get(request_id, 0) / MICRO,
                        estimate_su=admission.estimate_usu / MICRO, free=admission.free,
                    ),
                    "placement": admission.decision.explain(),
                })
            annotated[request_id] = outcome
        return annotated

    def _update_replicas(self, outcomes, admitted, db) -> None:
        by_replica: dict[str, tuple[str, list]] = {}
        for request_id, outcome in outcomes.items():
            if request_id in admitted:
                admission = admitted[request_id][0]
                by_replica.setdefault(admission.replica_id, (admission.site, []))[1].append(outcome)
        for replica_id, (site, batch) in by_replica.items():
            results = [o for o in batch if isinstance(o, ServedResult)]
            if results:
                first = results[0]
                self.broker.registry.served(replica_id, len(batch), first.timings.load_s + first.timings.run_s,
                                            first.replica.replica_id, db)
                self.broker.health.succeeded(site)
            else:
                self.broker.registry.failed(replica_id, len(batch))
            if any(isinstance(o, SiteError) for o in batch):
                self.broker.health.failed(site)
