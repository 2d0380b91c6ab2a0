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
  succeeded, release what failed), results left by reference
  (:mod:`tpm_fed.references.records`) and the replica's row; then the replica
  registry and site health in memory. Results come back annotated with their
  charge and placement.

Nothing is written per request on the submitting thread.

A reservation's deadline is its site's task timeout twice over (a first try
and a retry) plus a margin. When the outcomes' transaction fails, the
outcomes are logged on their own where the database allows, and the
reservations are left to the sweeper (:mod:`tpm_fed.ledger.sweeper`), which
settles each from what the log says the work used, or releases it. A request
placed again after its task was lost (:meth:`Bookkeeper.replaced`) keeps its
reservation, and its log row is marked queued again instead of inserted.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from sqlalchemy.exc import IntegrityError

from tpm_fed.broker import Admission, Broker
from tpm_fed.federation import Price
from tpm_fed.ledger import Metered, node_ms_used, price_usu
from tpm_fed.protocol.errors import InvalidRequest, SiteError
from tpm_fed.protocol.kinds import KINDS, Kind
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ChargeInfo, ServedResult, TensorResult
from tpm_fed.references.reader import StoreTensorReader
from tpm_fed.references.records import ReferenceRecords
from tpm_fed.state import RequestLog, WriterBusy, refuse_waiting_writer
from tpm_fed.state.schema import MICRO

logger = logging.getLogger(__name__)

RETRY_MARGIN_S = 60.0
"""Added to twice a site's task timeout to make a reservation's deadline."""


class Bookkeeper:
    def __init__(self, log: RequestLog, broker: Broker, references: ReferenceRecords) -> None:
        if not (log.engine is broker.ledger.engine is references.engine):
            raise ValueError("the request log and the ledger must share one database (one transaction per batch)")
        self.log = log
        self.broker = broker
        self.references = references
        self._admissions: dict[str, tuple[Admission, Price]] = {}
        self._resent: set[str] = set()  # placed again after a lost task: logged already
        self._lock = threading.Lock()
        self.outcome_writers: list = []
        """Called as ``writer(outcomes, db)`` inside each batch's outcomes transaction, with the outcomes as
        the callers will get them (results annotated with their charge): what must be durable exactly when
        the charges are (a batch line's answer; :mod:`tpm_fed.batches.runner`)."""

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

    def in_flight(self) -> set[str]:
        """Requests placed here whose outcome is not recorded yet (the sweeper leaves them alone)."""
        with self._lock:
            return set(self._admissions)

    def admission_of(self, request_id: str) -> Admission | None:
        with self._lock:
            entry = self._admissions.get(request_id)
        return entry[0] if entry is not None else None

    def replaced(self, admission: Admission) -> None:
        """A request whose task was lost is placed again (``admission``, reserved already)."""
        with self._lock:
            _, price = self._admissions[admission.request_id]
            self._admissions[admission.request_id] = (admission, price)
            self._resent.add(admission.request_id)

    def moved(self, admission: Admission) -> None:
        """A placed request not sent yet goes to another replica (``admission``, not reserved yet)."""
        with self._lock:
            _, price = self._admissions[admission.request_id]
            self._admissions[admission.request_id] = (admission, price)

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

        Raises:
            WriterBusy: Inside :func:`~tpm_fed.state.writing_now`, the database would have had to wait (nothing
                was written, and the holds stay for the reservation tried later).
        """
        refuse_waiting_writer(self.log.engine)
        with self._lock:
            pending = [self._admissions[r.request_id][0] for r in requests if r.request_id in self._admissions]
        to_reserve = [a for a in pending if not a.reserved]
        try:
            refused = self._reserve_and_log(site, version, requests, to_reserve)
        except WriterBusy:  # nothing was written, and they will be reserved later: their holds stay
            raise
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
        timeout_s = next((s.task_timeout_s for s in self.broker.federation.sites if s.name == site), None)
        # A site gone from the federation since placement: the ledger's own hold time.
        deadline = time.time() + 2 * timeout_s + RETRY_MARGIN_S if timeout_s is not None else None
        holds = [dataclasses.replace(a.hold(), deadline=deadline) for a in to_reserve]
        with self._lock:
            resent = [r for r in requests if r.request_id in self._resent]
        fresh = [r for r in requests if r.request_id not in {x.request_id for x in resent}]

        def once(look_first: bool) -> dict[str, BaseException]:
            with self.log.engine.begin() as db:
                refused = self.broker.ledger.reserve_many(holds, db, look_first=look_first)
                self.log.record_sent(site, version, [r for r in fresh if r.request_id not in refused], db)
                self.log.record_resent(site, version, resent, db)
            return refused

        try:
            refused = once(look_first=False)
        except IntegrityError:  # an id was charged or logged already: again, looking first
            refused = once(look_first=True)
        with self._lock:  # logged as resent now (not before: a write that did not happen is tried again)
            self._resent.difference_update(r.request_id for r in resent)
        return refused

    def record_outcomes(
        self, outcomes: dict[str, ServedResult | BaseException]
    ) -> dict[str, ServedResult | BaseException]:
        """Log, settle or release, and update the replica: one transaction for the batch."""
        with self._lock:
            admitted = {rid: self._admissions.pop(rid) for rid in outcomes if rid in self._admissions}
        settle, release, references = [], [], []
        lines: dict[str, list[int]] = {}  # request -> its charge lines (micro-SUs), priced once
        for request_id, outcome in outcomes.items():
            if request_id not in admitted:
                continue
            admission, price = admitted[request_id]
            if getattr(outcome, "tensors_ref", None) is not None:
                adopted = self.references.adopt(admission.site, outcome.tensors_ref)
                outcomes[request_id] = outcome = outcome.model_copy(update={"tensors_ref": adopted})
                references.append((request_id, admission.site, adopted))
            if isinstance(outcome, TensorResult):  # read in this process from the stores it can open
                outcome.with_reader(StoreTensorReader())
            if isinstance(outcome, ServedResult):
                # Every node of a multi-node replica is charged: its starts and its time.
                nodes = self.broker.placer.nodes(admission.request.model, admission.site)
                used = Metered(outcome.usage.prompt_tokens, outcome.usage.completion_tokens,
                               outcome.usage.activation_bytes, cold_start=not outcome.replica.warm, nodes=nodes,
                               node_ms=node_ms_used(nodes, outcome.timings.load_s, outcome.timings.run_s,
                                                    outcome.replica.batch_size))
                lines[request_id] = charge_lines(KINDS[admission.request.kind], outcome, price, used)
                settle.append((request_id, used, sum(lines[request_id])))
            else:
                release.append((request_id, f"{type(outcome).__name__}: {outcome}"))
        try:
            with self.log.engine.begin() as db:
                self.log.record_outcomes(outcomes, db)
                self.references.record(references, db)
                charged = self.broker.ledger.settle_many(settle, db)
                self.broker.ledger.release_many(release, db)
                self._update_replicas(outcomes, admitted, db)
                # Annotated before the writers run, so a batch line's answer is rendered with its charge and
                # written in this transaction; the callers get these objects only once it has committed.
                annotated = self._annotated(outcomes, admitted, charged, lines)
                for writer in self.outcome_writers:
                    writer(annotated, db)
        except Exception:
            self._outcomes_unsettled(outcomes, admitted)
            raise
        return annotated

    @staticmethod
    def _annotated(outcomes, admitted, charged, lines) -> dict[str, ServedResult | BaseException]:
        """The outcomes, each result with its charge (``charged``: micro-SUs by request) and placement."""
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
                if KINDS[admission.request.kind].charged_by_step:  # a line per step, adding up to the charge
                    outcome = outcome.model_copy(update={"steps": [
                        step.model_copy(update={"charged_su": usu / MICRO})
                        for step, usu in zip(outcome.steps, lines[request_id], strict=True)
                    ]})
            annotated[request_id] = outcome
        return annotated

    def _outcomes_unsettled(self, outcomes, admitted) -> None:
        """The batch's transaction failed: keep what the work used, and the replicas' queues right.

        The outcomes are logged on their own (a failure in the ledger's part
        leaves the log writable); the reservations stay held until the
        sweeper settles them from that log, or releases them.
        """
        try:
            self.log.record_outcomes(outcomes)
        except Exception:
            logger.exception("could not log the outcomes of %d requests either; the sweeper will release them",
                             len(outcomes))
        by_replica: dict[str, int] = {}
        for request_id in outcomes:
            if request_id in admitted:
                replica_id = admitted[request_id][0].replica_id
                by_replica[replica_id] = by_replica.get(replica_id, 0) + 1
        for replica_id, count in by_replica.items():
            self.broker.registry.failed(replica_id, count)

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
                # Its service time is the task's run: a cold start's load is paid once, not by every request
                # placed behind it later (a slow first load would skew a batch's split between sites).
                self.broker.registry.served(replica_id, len(batch), first.timings.run_s, first.replica.replica_id, db)
                # Generation's pace by task size, for batch quotes: the task's rows, its longest output
                # (not a replica's first task: its first steps pay for warming up).
                steps = max(r.usage.completion_tokens for r in results)
                if steps and first.replica.warm:
                    self.broker.registry.pace(replica_id).observe(first.replica.batch_size, steps,
                                                                  first.timings.run_s)
                self.broker.health.succeeded(site)
            else:
                self.broker.registry.failed(replica_id, len(batch))
            if any(isinstance(o, SiteError) for o in batch):
                self.broker.health.failed(site)


def charge_lines(kind: Kind, outcome: ServedResult, price: Price, used: Metered) -> list[int]:
    """Micro-SUs per charge line: one for most results (``used``), one per step of a kind charged by step
    (a session; the first carries the cold start and the node time), each rounded up on its own so the
    lines add up to the charge exactly."""
    if not kind.charged_by_step:
        return [price_usu(price, used)]
    cold = not outcome.replica.warm
    first = {"cold_start": cold, "nodes": used.nodes, "node_ms": used.node_ms}  # the start and the time: once
    return [price_usu(price, Metered(step.usage.prompt_tokens, step.usage.completion_tokens,
                                     step.usage.activation_bytes, **(first if index == 0 else {})))
            for index, step in enumerate(outcome.steps)]
