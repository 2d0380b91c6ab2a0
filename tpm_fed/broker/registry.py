"""Replicas the broker has placed: in memory for speed, written through to the database.

Lifecycle: ``starting`` (placed, not yet served) -> ``warm`` (served at least
once) -> ``draining`` (idle past its site's keep-alive; takes no new work)
-> ``stopped``. The database row is the record: a broker that restarts reads
it back. Replicas held by a local site live in a process of this machine;
when that process is gone, so are they, and they are marked stopped.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from tpm_fed.broker.pace import StepModel
from tpm_fed.broker.placement import DEFAULT_SERVICE_S, ReplicaView
from tpm_fed.state.database import transaction
from tpm_fed.state.holders import process_alive, this_process
from tpm_fed.state.schema import replicas_table

SERVICE_TIME_WEIGHT = 0.3
"""Weight of the newest batch in a replica's moving-average service time."""


class ReplicaRegistry:
    def __init__(self, engine: Engine, holder: str | None = None) -> None:
        self.engine = engine
        self.holder = holder or this_process()
        self._lock = threading.Lock()
        self._replicas: dict[str, ReplicaView] = {}
        self._by_model: dict[tuple[str, str], dict[str, ReplicaView]] = defaultdict(dict)
        self._by_site: dict[str, dict[str, ReplicaView]] = defaultdict(dict)
        self._live: dict[str, int] = defaultdict(int)  # kept current: placement reads it every time
        self._paces: dict[str, StepModel] = {}  # per replica: how its step time grows with rows (quotes)
        r = replicas_table.c
        self._served = update(replicas_table).where(r.replica_id == bindparam("rid")).values(
            state=bindparam("state"), last_used=bindparam("now"), service_s=bindparam("service_s"),
            worker=bindparam("worker"), served_requests=r.served_requests + bindparam("requests"))
        self._load()

    def _load(self) -> None:
        with self.engine.begin() as db:
            rows = db.execute(select(replicas_table).where(replicas_table.c.state != "stopped")).all()
            for row in rows:
                if not process_alive(row.holder):
                    db.execute(update(replicas_table).where(replicas_table.c.replica_id == row.replica_id)
                               .values(state="stopped"))
                    continue
                self._remember(ReplicaView(row.replica_id, row.site, row.model, row.version, row.state,
                                           0, row.service_s, row.last_used, row.backend))

    def _remember(self, replica: ReplicaView) -> None:
        """Called under the lock (or before any other thread can see us)."""
        previous = self._replicas.get(replica.replica_id)
        if previous is not None and previous.live:
            self._live[previous.site] -= 1
        self._replicas[replica.replica_id] = replica
        self._by_model[(replica.model, replica.version)][replica.replica_id] = replica
        self._by_site[replica.site][replica.replica_id] = replica
        if replica.live:
            self._live[replica.site] += 1

    def of_model(self, model: str, version: str) -> list[ReplicaView]:
        with self._lock:
            return list(self._by_model.get((model, version), {}).values())

    def live_per_site(self) -> dict[str, int]:
        """Live replicas per site (a live view: read it, do not change it)."""
        return self._live

    def evictable(self, site: str) -> ReplicaView | None:
        """The site's least recently used live replica with nothing queued, if any."""
        with self._lock:
            idle = [r for r in self._by_site.get(site, {}).values() if r.live and r.queue_depth == 0]
        return min(idle, key=lambda r: r.last_used, default=None)

    def get(self, replica_id: str) -> ReplicaView | None:
        with self._lock:
            return self._replicas.get(replica_id)

    def all(self) -> list[ReplicaView]:
        with self._lock:
            return list(self._replicas.values())

    def start(self, site: str, model: str, version: str, backend: str) -> ReplicaView:
        """Record a new replica, ``site/model@version/backend/N`` with the lowest free N."""
        now = time.time()
        with self._lock:
            number = 0
            while (known := self._replicas.get(f"{site}/{model}@{version}/{backend}/{number}")) and known.live:
                number += 1
            replica_id = f"{site}/{model}@{version}/{backend}/{number}"
            replica = ReplicaView(replica_id, site, model, version, "starting", 0, DEFAULT_SERVICE_S, now, backend)
            self._remember(replica)
        with self.engine.begin() as db:
            values = dict(site=site, model=model, version=version, backend=backend, state="starting",
                          holder=self.holder, served_requests=0, service_s=DEFAULT_SERVICE_S,
                          started_at=now, last_used=now)
            if db.execute(update(replicas_table).where(replicas_table.c.replica_id == replica_id)
                          .values(**values)).rowcount == 0:
                db.execute(insert(replicas_table).values(replica_id=replica_id, **values))
        return replica

    def queued(self, replica_id: str, count: int = 1) -> None:
        with self._lock:
            self._replicas[replica_id].queue_depth += count

    def served(
        self, replica_id: str, requests: int, batch_s: float, worker: str | None, db: Connection | None = None
    ) -> None:
        """A batch finished on the replica: it is warm, and its service time is updated.

        A replica stopped while the batch ran (its slot given away) stays stopped.
        The row is written in ``db``'s transaction, if given.
        """
        now = time.time()
        with self._lock:
            replica = self._replicas[replica_id]
            replica.queue_depth = max(0, replica.queue_depth - requests)
            replica.service_s = (1 - SERVICE_TIME_WEIGHT) * replica.service_s + SERVICE_TIME_WEIGHT * batch_s
            if replica.state == "starting":
                replica.state = "warm"
            replica.last_used = now
            state, service_s = replica.state, replica.service_s
        with transaction(self.engine, db) as db:
            db.execute(self._served, {"rid": replica_id, "state": state, "now": now, "service_s": service_s,
                                      "worker": worker, "requests": requests})

    def pace(self, replica_id: str) -> StepModel:
        """How fast the replica generates by rows run together (empty until it served generation)."""
        with self._lock:
            return self._paces.setdefault(replica_id, StepModel())

    def failed(self, replica_id: str, requests: int) -> None:
        with self._lock:
            replica = self._replicas[replica_id]
            replica.queue_depth = max(0, replica.queue_depth - requests)

    def set_state(self, replica_ids: list[str], state: str) -> None:
        if not replica_ids:
            return
        with self._lock:
            for replica_id in replica_ids:
                replica = self._replicas[replica_id]
                self._live[replica.site] += int(state in ("starting", "warm")) - int(replica.live)
                replica.state = state
        with self.engine.begin() as db:
            db.execute(update(replicas_table).where(replicas_table.c.replica_id.in_(replica_ids))
                       .values(state=state))

    def recorded(self, limit: int = 50) -> list[ReplicaView]:
        """Every replica the database remembers, stopped ones too, most recent first."""
        with self.engine.connect() as db:
            rows = db.execute(
                select(replicas_table).order_by(replicas_table.c.last_used.desc()).limit(limit)
            ).all()
        live = {r.replica_id: r for r in self.all()}
        return [
            live.get(row.replica_id)
            or ReplicaView(row.replica_id, row.site, row.model, row.version, row.state, 0, row.service_s,
                           row.last_used, row.backend)
            for row in rows
        ]

    def idle_since(self, cutoff_by_site: dict[str, float]) -> list[ReplicaView]:
        """Live replicas with nothing queued, unused since their site's cutoff."""
        with self._lock:
            return [
                r for r in self._replicas.values()
                if r.live and r.queue_depth == 0 and r.last_used < cutoff_by_site.get(r.site, float("-inf"))
            ]
