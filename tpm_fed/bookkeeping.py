"""Everything written about a batch when it leaves and when it comes back.

The dispatcher calls this once per batch: the request log, the ledger
(settle what succeeded, release what failed: in one transaction each), the
replica registry (warm, service time) and site health. Results come back
annotated with their charge and placement.
"""

from __future__ import annotations

import threading

from tpm_fed.broker import Admission, Broker
from tpm_fed.protocol.errors import SiteError
from tpm_fed.federation import Price
from tpm_fed.ledger import Metered, price_usu
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ChargeInfo, ServedResult
from tpm_fed.state import RequestLog
from tpm_fed.state.schema import MICRO


class Bookkeeper:
    def __init__(self, log: RequestLog, broker: Broker) -> None:
        self.log = log
        self.broker = broker
        self._admissions: dict[str, tuple[Admission, Price]] = {}
        self._lock = threading.Lock()

    def admitted(self, admission: Admission, price: Price) -> None:
        with self._lock:
            self._admissions[admission.request_id] = (admission, price)

    def record_sent(self, site: str, version: str, requests: list[ServingRequest]) -> None:
        self.log.record_sent(site, version, requests)

    def record_outcomes(
        self, outcomes: dict[str, ServedResult | BaseException]
    ) -> dict[str, ServedResult | BaseException]:
        with self._lock:
            admitted = {rid: self._admissions.pop(rid) for rid in outcomes if rid in self._admissions}
        self.log.record_outcomes(outcomes)
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
        charged = self.broker.ledger.settle_many(settle) if settle else {}
        if release:
            self.broker.ledger.release_many(release)
        self._update_replicas(outcomes, admitted)

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

    def _update_replicas(self, outcomes, admitted) -> None:
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
                                            first.replica.replica_id)
                self.broker.health.succeeded(site)
            else:
                self.broker.registry.failed(replica_id, len(batch))
            if any(isinstance(o, SiteError) for o in batch):
                self.broker.health.failed(site)
