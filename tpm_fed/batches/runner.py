"""The service's batch runner: feeds pending lines to the runtime and records each line's end once.

One thread with its own event loop. It claims pending lines (projects in
turn, each its oldest batch first, in input order) up to a window, serves each on the runtime's ``submit``,
the HTTP routes' path (so placement, batching and charging are identical),
its answer rendered by its route's own serving object (handed in as :class:`~tpm_fed.batches.lines.LineRoutes`
by the composition root), and records the answer and the ledger's charge in
the database. The window is a couple of full replica batches per site, so
the dispatcher always has a whole batch to send while another runs, and a
huge file never floods the queues other callers share.

Exactly once: before a line's request goes out its id is written on the
line, and its answer ends the line in the very transaction that settles its
charge (the bookkeeper's; a result its route cannot render is kept there
instead, and recorded after); a finished line is never claimed again. A service
that stops gracefully lets the lines in flight finish first (``stop``); one
that is killed leaves them ``running``, and the next runner puts them back
in the queue. A line whose earlier request was settled is answered from its
kept result (not run, not charged again); one whose request had no recorded
outcome was released by the ledger's sweeper, and runs again. (Only if the
outcomes' transaction itself failed, and the sweeper settled the charge from
the request log, does a line run twice and carry both charges.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tpm_fed.batches.batch_ends import BatchEnds
from tpm_fed.batches.engine_interface import BatchEngine, Observer
from tpm_fed.batches.lines import LineRoutes, charging
from tpm_fed.batches.store import BatchStore, ClaimedLine, LineEnd
from tpm_fed.protocol.errors import Overloaded, PlacementRefused, TpmError
from tpm_fed.protocol.http_errors import http_error
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.protocol.requests import BATCH_PRIORITY, ServingRequest
from tpm_fed.protocol.results import ChargeInfo, ServedResult, TensorResult
from tpm_fed.state.schema import MICRO

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 2
"""A line that fails this many times ends with its error; the rest of its batch goes on."""

BATCHES_PER_SITE = 2
"""Lines in flight per site: this many full replica batches (one running, one gathered behind it)."""

MAX_DEFERRALS = 120
"""Times a line may wait for the broker to find it a replica ("none can take it now") before that counts as a
failure: with :func:`deferral_s`, about an hour."""

STOP_GRACE_S = 20.0
"""How long a stopping runner waits for the lines in flight (then they run again after the restart)."""

REFILL_SHARE = 4
"""The runner claims more lines once this share (a quarter) of its window is free, not after every line that
ends: lines answered one at a time (a vLLM replica's early answers) cost a claim and a note of their ids each,
two write transactions, for one line. Three quarters of the window stay in flight."""

FILE_SWEEP_PERIOD_S = 60.0
"""How often expired uploads are deleted (an expired file is refused at once, whether swept yet or not)."""


class BatchRunner:
    """Runs every batch of ``store`` on ``runtime``.

    Args:
        runtime: The federation engine (its ``submit`` is the routes' path).
        store: The batches' tables.
        routes: The routes a line may name (the serving objects the HTTP routes use).
        observer: Told of every request (the service's metrics), as the routes tell it.
        window: Lines in flight at once (default: :data:`BATCHES_PER_SITE` full batches per replica slot).
        poll_s: How often to look for work nobody woke it for.
    """

    def __init__(self, runtime: BatchEngine, store: BatchStore, routes: LineRoutes, *,
                 observer: Observer | None = None, window: int | None = None, poll_s: float = 2.0) -> None:
        self.runtime = runtime
        self.store = store
        self.routes = routes
        self.observer = observer
        self.window = window or max(4, sum(site.max_batch_requests * site.capacity.max_replicas * BATCHES_PER_SITE
                                           for site in runtime.federation.sites))
        self.poll_s = poll_s
        self.refill = max(1, self.window // REFILL_SHARE)
        """Free slots at which the runner claims more lines."""
        self._stopping = False
        self._woken = True  # a batch was created or cancelled (or the runner starts): look at every batch
        self._next_look = 0.0  # when to look at every batch anyway (an expiry; lines deferred until then)
        self._drained = False  # the last claim found fewer lines than it asked for (none pending)
        self._requeued = 0  # lines put back in the queue by the recorder (a drained queue is not drained then)
        self._in_flight: set[_Out] = set()  # lines sent whose end is not recorded yet (the loop's)
        self._ended: list[_Out] = []  # lines whose answer came, to record together
        self._ended_lock = threading.Lock()
        self._recording = False  # a recorder is running or scheduled on the loop (under _ended_lock)
        self._recorder: asyncio.Task | None = None  # held: the loop keeps only a weak reference to a task
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="tpm-batches", daemon=True)
        self._sent: dict[str, tuple[ClaimedLine, Any, ServingRequest]] = {}  # batch requests out now, by id
        self._written: dict[str, tuple[ServedResult, list[str]]] = {}  # lines ended with their charge: the result
        self.ends = BatchEnds()
        """Callers waiting for a batch to end (the long poll of ``GET /v1/batches/{id}?wait=S``)."""
        runtime.add_outcome_writer(self._write_ends)

    def _write_ends(self, outcomes: dict[str, Any], db: Any) -> None:
        """In the bookkeeper's transaction: a batch line's answer, rendered with its charge, ends the line in
        the very transaction that charges it (no second transaction per task to record it, no kept result to
        write and delete). A result its route cannot render is kept beside its charge instead, as before, and
        the recorder handles the failure; so is one with tensors (its render may read them from a store: not
        while this transaction holds the database's write lock). The recorder sees which lines ended here by their result: the
        bookkeeper hands its callers these objects only once this transaction has committed."""
        ends, kept, written = [], {}, {}
        for rid, result in outcomes.items():
            sent = self._sent.get(rid)
            if sent is None or not isinstance(result, ServedResult) or result.charge is None:
                continue
            line, body, request = sent
            if isinstance(result, TensorResult):
                kept[rid] = result
                continue
            try:
                ends.append(_line_end(line, request, self.routes.render(line.url, body, request, result)))
                written[rid] = result
            except Exception:  # noqa: BLE001 - rendered again by the recorder, which records the failure
                kept[rid] = result
        self.store.keep_results(db, kept)
        ended = self.store.finish_many(ends, db)
        self._written.update((rid, (result, ended)) for rid, result in written.items())

    def start(self) -> BatchRunner:
        self._thread.start()
        self._ready.wait(timeout=30)
        return self

    def wake(self) -> None:
        """Look for work now (a batch was created or cancelled)."""
        self._woken = True
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    @property
    def busy(self) -> bool:
        """Whether a batch is in progress (a service idle of callers must not stop under it)."""
        return bool(self._in_flight) or self.store.has_work()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Claim nothing more; let the lines in flight finish (up to ``grace_s``), then end the thread."""
        self._stopping = True
        self.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=grace_s + 5)

    def _run_loop(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            logger.exception("the batch runner stopped")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._next_file_sweep = 0.0
        recovered = await asyncio.to_thread(self.store.recover)
        if recovered:
            logger.info("batches: %d line(s) a stopped service left running go back to the queue", recovered)
        self._ready.set()
        while not self._stopping:
            self._wake.clear()
            # Every open batch is looked at (one transaction) when one was created or cancelled, and every
            # poll_s for expiries and deferred lines; a batch whose last lines end is settled as they are
            # recorded (``finish_many``). A pass woken by lines that ended only claims more, if a quarter of
            # the window is free and a line may be pending.
            woken, self._woken = self._woken, False
            looking = woken or time.monotonic() >= self._next_look
            if looking:
                self._next_look = time.monotonic() + self.poll_s
                self._drained = False
            try:
                free = self.window - len(self._in_flight)
                if free >= self.refill and not self._drained:
                    requeued = self._requeued
                    claimed = await asyncio.to_thread(self.store.claim, free)
                    self._drained = len(claimed) < free and requeued == self._requeued
                    for out in await asyncio.to_thread(self._send, claimed):
                        self._in_flight.add(out)
                        if isinstance(out.sent, Future):
                            out.sent.add_done_callback(lambda _, out=out: self._answered(out))
                        else:  # not sent: it ends now, with its error
                            self._answered(out)
                if looking:
                    self.ends.ended(await asyncio.to_thread(self.store.settle_batches))
                if time.monotonic() >= self._next_file_sweep:  # expired uploads leave the database
                    self._next_file_sweep = time.monotonic() + FILE_SWEEP_PERIOD_S
                    await asyncio.to_thread(self.store.sweep_expired_files)
            except Exception:  # the database may be away a moment: the next pass tries again
                logger.exception("batches: a pass of the runner failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            except TimeoutError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.ends.ended(await asyncio.to_thread(self.store.settle_batches))

    def _send(self, claimed: list[ClaimedLine]) -> list[_Out]:
        """Build the claimed lines' requests, note their ids (one transaction), then submit them back to back.

        Inside one ``Runtime.burst()``, so a window of lines leaves as full replica batches, not its first
        few lines alone while the rest are still being placed. Returns per line its body, request, and the
        runtime's future, or the error that kept it from being built or placed (recorded as the line's
        failure, where failures are handled).
        """
        kept = self.store.kept_results([rid for line in claimed for rid in line.request_ids])
        built: list[tuple[ClaimedLine, Any, Any, Any]] = []
        for line in claimed:
            try:
                body = charging(self.routes.parse_body(line.url, line.body), line.project)
                request = self.routes.request_for(line.url, body)
                if "priority" in type(request).model_fields:  # after every interactive request, in vLLM's scheduler
                    request = request.model_copy(update={"priority": request.priority + BATCH_PRIORITY})
                done = next((rid for rid in line.request_ids if rid in kept), None)
                if done is not None:  # it ran and was charged before a stop: answer from its kept result
                    built.append((line, body, request.model_copy(update={"request_id": done}),
                                  _kept_future(*kept[done])))
                else:
                    built.append((line, body, request, None))
            except Exception as error:  # noqa: BLE001 - the line's own failure, recorded as such
                built.append((line, None, None, error))
        to_send = [(line, request) for line, _, request, outcome in built if request is not None and outcome is None]
        self.store.submitted([(line.batch_id, line.index, request.request_id) for line, request in to_send])
        self._sent.update((request.request_id, (line, body, request)) for line, body, request, outcome in built
                          if request is not None and outcome is None)
        sent = []
        with self.runtime.burst():  # the window leaves in full tasks, not its first few lines alone
            for line, body, request, outcome in built:
                started = time.perf_counter()
                if request is not None and outcome is None:
                    try:
                        outcome = self.runtime.submit(request, line.owner, background=True)  # the future, on success
                    except Exception as refused:  # noqa: BLE001 - the line's own failure, recorded as such
                        outcome = refused
                sent.append(_Out(line, body, request, outcome, started))
        return sent

    def _answered(self, out: _Out) -> None:
        """A line's future ended (on the thread that settled its task): queue it to be recorded.

        A task's lines end together, so the first schedules one recorder on the loop and the rest only
        join the queue: no thread hop, no transaction per line."""
        out.seconds = time.perf_counter() - out.started
        with self._ended_lock:
            self._ended.append(out)
            if self._recording:
                return
            self._recording = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_recorder)

    def _start_recorder(self) -> None:
        self._recorder = asyncio.get_running_loop().create_task(self._record_answered())

    async def _record_answered(self) -> None:
        """Record the lines that ended, together, until none is left; then a pass may claim more."""
        while True:
            with self._ended_lock:
                ended, self._ended = self._ended, []
                if not ended:
                    self._recording = False
                    return
            try:
                self.ends.ended(await asyncio.to_thread(self._record, ended))
            except Exception:  # the database may be away: the lines stay running, and run again after a restart
                logger.exception("batches: could not record the end of %d line(s)", len(ended))
            finally:
                for out in ended:
                    self._in_flight.discard(out)
                    if out.request is not None:
                        self._sent.pop(out.request.request_id, None)
                        self._written.pop(out.request.request_id, None)
                self._wake.set()  # slots are free

    def _record(self, ended: list[_Out]) -> list[str]:
        """Render each ended line's answer as its route would, and record them in one transaction (a line that
        failed is handled alone: retried once, deferred, or ended with its error). Returns the batches that
        ended."""
        ends, batches_ended = [], []
        for out in ended:
            try:
                if not isinstance(out.sent, Future):
                    raise out.sent
                try:
                    result = out.sent.result()
                except Exception as error:
                    self._observe(out.request, out.seconds, error=error)
                    raise
                self._observe(out.request, out.seconds, result)
                written = self._written.pop(out.request.request_id, None)
                if written is not None and written[0] is result:  # ended with its charge (``_write_ends``)
                    batches_ended += written[1]
                    continue
                answer = self.routes.render(out.line.url, out.body, out.request, result)
            except Exception as error:  # noqa: BLE001 - any failure is the line's: retried once, then its error
                try:
                    batches_ended += self._failed(out.line, error)
                except Exception:  # the database may be away: this line stays running; the others are recorded
                    logger.exception("batch %s line %d: could not record its failure", *out.key)
            else:
                ends.append(_line_end(out.line, out.request, answer))
        return batches_ended + self.store.finish_many(ends)

    def _observe(self, request: ServingRequest, seconds: float, result: ServedResult | None = None,
                 error: BaseException | None = None) -> None:
        if self.observer is not None:
            self.observer.observe(request.kind, request.model.name, seconds, result, error)

    def _failed(self, line: ClaimedLine, error: Exception) -> list[str]:
        """Retry, defer or end a line that failed; the batches that ended (its own, if it was the last)."""
        if not isinstance(error, TpmError):
            logger.exception("batch %s line %d failed unexpectedly", line.batch_id, line.index, exc_info=error)
        if isinstance(error, (PlacementRefused, Overloaded)) and line.deferrals < MAX_DEFERRALS:
            # Busy, not wrong (every replica slot holds another model, say): wait, as a caller would on 503.
            logger.info("batch %s line %d waits %.0f s: %s", line.batch_id, line.index,
                        deferral_s(line.deferrals), error)
            self.store.defer(line.batch_id, line.index, deferral_s(line.deferrals))
            self._requeue()  # claimed by a pass after its wait (the look every poll_s)
            return []
        if line.attempts + 1 < MAX_ATTEMPTS:
            self.store.retry_later(line.batch_id, line.index)
            self._requeue()
            return []
        answer = http_error(error)  # one we did not foresee: a 500 naming its type
        return self.store.finish(line.batch_id, line.index, state="failed", status_code=answer.status,
                                 response=answer.body())

    def _requeue(self) -> None:
        """A line went back to the queue: a pass may claim again (also one whose claim is in flight now)."""
        self._requeued += 1
        self._drained = False


@dataclass(eq=False)  # each run of a line is its own (a line retried goes out again as another)
class _Out:
    """A claimed line on its way: sent (``sent`` is the runtime's future) or not (``sent`` is why)."""

    line: ClaimedLine
    body: Any
    request: ServingRequest | None
    sent: Future | BaseException
    started: float
    seconds: float = 0.0
    """From its submit to its answer (the metrics' latency)."""

    @property
    def key(self) -> tuple[str, int]:
        return self.line.batch_id, self.line.index


def _line_end(line: ClaimedLine, request: ServingRequest, answer: dict[str, Any]) -> LineEnd:
    """A line answered ``answer``. Its charge is the ledger's under the ids it went out under, as noted before
    it went (one answered from a kept result went out under that one before)."""
    usage = answer.get("usage") or {}
    return LineEnd(line.batch_id, line.index, "done", 200, answer, int(usage.get("prompt_tokens") or 0),
                   int(usage.get("completion_tokens") or 0),
                   request_ids=tuple(dict.fromkeys((*line.request_ids, request.request_id))))


def deferral_s(deferrals: int) -> float:
    """Seconds a line waits after its ``deferrals``-th "not now" (1, 2, 4... up to 30)."""
    return float(min(30, 2 ** deferrals))


def _kept_future(kind: str, wire: dict[str, Any], charge: Any) -> Future:
    """A finished future of a kept result, with its charge as the ledger settled it."""
    result = KINDS[kind].result.from_wire(wire).model_copy(update={"charge": ChargeInfo(
        project=charge.project, charged_su=charge.charged_usu / MICRO, estimate_su=charge.estimate_usu / MICRO,
        free=charge.free)})
    future: Future = Future()
    future.set_result(result)
    return future
