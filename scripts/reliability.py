"""Inject faults into a running tpm-fed and count what survived: writes docs/reliability.md.

    python scripts/reliability.py                      # every fault, then the fuzzers
    python scripts/reliability.py --skip-fuzz --skip-amqp --out /tmp/r.md

Each fault runs against real parts on this machine: the service over HTTP
on loopback (uvicorn), the federation runtime with its local site (the
Globus Compute endpoint engine, Parsl HTEX workers), and for the AMQP rows
the Globus Compute SDK's own result watcher against a real RabbitMQ server
(Debian's rabbitmq-server; scripts/install-servers.sh installs it). For
every request sent, the ledger is read afterwards:

- **lost**: sent, and neither answered nor refused with a typed error
  within the bound, or still holding a reservation after it finished;
- **double charges**: more than one ledger line for one request, or a
  balance whose spending differs from the sum of its settled lines;
- **survived**: the service answered as it should (a result equal to an
  undisturbed run, or a typed refusal that charged nothing) and kept
  serving the next request.

Numbers are what happened on this run, not targets: rerun it after a change.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchlib import log, machine  # noqa: E402

WAIT_S = 300.0
SPACING_S = 11.0
"""Between link faults: the SDK's watcher gives up after 3 channel closes within 10 s."""
PROMPTS = ["The cell", "The climate model runs", "A scientist can reproduce", "The river carries",
           "The detector counts", "The galaxy contains", "An allocation is", "The experiment was"]


@dataclass
class Row:
    fault: str
    injected: int = 0
    survived: int = 0
    lost: int = 0
    double_charges: int = 0
    notes: list[str] = field(default_factory=list)


# -- the ledger's view ------------------------------------------------------------------


def ledger_lines(runtime) -> list:
    return runtime.ledger.statement()


def settle_wait(runtime, request_ids: set[str], bound_s: float = 120.0) -> list:
    """The ledger lines of ``request_ids`` once none is still reserved (or the bound passes)."""
    deadline = time.monotonic() + bound_s
    while True:
        lines = [c for c in ledger_lines(runtime) if c.request_id in request_ids]
        if all(c.state != "reserved" for c in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def count_double_charges(runtime, lines: list) -> int:
    per_request: dict[str, int] = {}
    for line in lines:
        per_request[line.request_id] = per_request.get(line.request_id, 0) + 1
    doubles = sum(n - 1 for n in per_request.values() if n > 1)
    settled = {}
    for line in ledger_lines(runtime):
        if line.state == "settled":
            settled[(line.project, line.site)] = settled.get((line.project, line.site), 0) + line.charged_usu
    for balance in runtime.ledger.balances():
        if balance.spent_usu != settled.get((balance.project, balance.site), 0):
            doubles += 1  # the balance moved by something other than its settled lines
    return doubles


def stranded(lines: list) -> int:
    return sum(1 for line in lines if line.state == "reserved")


# -- the service ---------------------------------------------------------------------------


def make_home(root: Path, model_dir: Path, extra_sites=(), extra_allocations=None):
    from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
    from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
    from tpm_fed.identity import LocalUser

    home = TpmHome(root)
    home.models_dir.mkdir(parents=True, exist_ok=True)
    if not (home.models_dir / DEMO_MODEL_NAME).exists():
        shutil.copytree(model_dir, home.models_dir / DEMO_MODEL_NAME)
    Federation(
        name="reliability",
        # A long linger: the killed worker's requests leave as one batch, however slow the machine.
        sites=[SiteConfig(name="local", batch_linger_ms=500), *extra_sites],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch",
                            kinds=["generate", "embed", "trace"])],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()],
                                allocations={"local": 1e6, **(extra_allocations or {})})],
    ).dump(home.federation_file)
    return home


def openai_error(response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and bool(error.get("message")) and isinstance(error.get("code"), str)


def serves_next(edge) -> bool:
    from tpm_fed.home import DEMO_MODEL_NAME

    answer = edge.post("/v1/completions", json={"model": DEMO_MODEL_NAME, "prompt": "The cell", "max_tokens": 2,
                                                "temperature": 0})
    return answer.status_code == 200


def malformed_bodies(edge, runtime, count: int) -> Row:
    row = Row("malformed JSON bodies (4 routes)")
    rng = random.Random(7)
    routes = ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tpm/v1/requests"]
    valid = json.dumps({"model": "demo-llama", "prompt": "The cell", "max_tokens": 2}).encode()
    before = ledger_lines(runtime)
    for index in range(count):
        kind = index % 4
        if kind == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        elif kind == 1:
            body = valid[: rng.randrange(1, len(valid))]  # truncated mid-document
        elif kind == 2:
            body = valid.replace(b'"', b"'")  # not JSON's quotes
        else:
            body = b"\xef\xbb\xbf" + valid[:-1] + b",}"  # byte-order mark, trailing comma
        response = edge.post(routes[index % len(routes)], content=body)
        row.injected += 1
        if 400 <= response.status_code < 500 and openai_error(response):
            row.survived += 1
        else:
            row.notes.append(f"{routes[index % len(routes)]} answered {response.status_code}")
    after = ledger_lines(runtime)
    if after != before:
        row.double_charges += len(after) - len(before)
        row.notes.append("the ledger changed on refusals")
    row.notes.append("served the next request" if serves_next(edge) else "did NOT serve the next request")
    return row


def over_limit_bodies(edge, runtime, url: str, token: str) -> Row:
    from tpm_fed.service.limits import MAX_BODY_BYTES

    row = Row(f"over-limit bodies (> {MAX_BODY_BYTES:,} bytes; declared, chunked, stalled)")
    before = ledger_lines(runtime)
    big = b'{"model": "demo-llama", "prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    declared = edge.post("/v1/completions", content=big)

    def chunks():
        for start in range(0, len(big), 1 << 20):
            yield big[start:start + (1 << 20)]

    chunked = edge.post("/tpm/v1/requests", content=chunks())
    for response, status in ((declared, 413), (chunked, 413)):
        row.injected += 1
        row.survived += int(response.status_code == status and openai_error(response))
        if response.status_code != status:
            row.notes.append(f"expected {status}, got {response.status_code}")
    row.injected += 1
    stalled = stalled_body(url, token)
    row.survived += int(stalled == 408)
    row.notes.append(f"a body that stops mid-way: {stalled}")
    if ledger_lines(runtime) != before:
        row.notes.append("the ledger changed on refusals")
    row.notes.append("served the next request" if serves_next(edge) else "did NOT serve the next request")
    return row


def stalled_body(url: str, token: str) -> int:
    """Send half a body and wait: the service's body timeout (shortened for this run) answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ".encode())
        raw.settimeout(60)
        answer = raw.recv(4096).decode(errors="replace")
    match = re.match(r"HTTP/1.1 (\d+)", answer)
    return int(match.group(1)) if match else 0


def client_disconnects(edge, runtime, url: str, token: str, count: int) -> Row:
    import httpx

    from tpm_fed.home import DEMO_MODEL_NAME

    row = Row("client disconnects mid-request (after the body; and mid-body)")
    before = {c.request_id for c in ledger_lines(runtime)}
    for _ in range(count):
        request = {"kind": "generate", "model": {"name": DEMO_MODEL_NAME}, "prompts": ["The cell"],
                   "max_new_tokens": 100, "min_new_tokens": 100}
        row.injected += 1
        try:
            httpx.post(f"{url}/tpm/v1/requests", headers={"Authorization": f"Bearer {token}"}, json=request,
                       timeout=httpx.Timeout(5, read=0.05))
            row.notes.append("a request answered before the client left (not a disconnect)")
        except httpx.ReadTimeout:
            pass
    deadline = time.monotonic() + 120
    while True:
        new = [c for c in ledger_lines(runtime) if c.request_id not in before]
        if (len(new) >= count and all(c.state != "reserved" for c in new)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    per_request = {}
    for line in new:
        per_request.setdefault(line.request_id, []).append(line)
    row.survived += sum(1 for lines in per_request.values() if len(lines) == 1 and lines[0].state == "settled")
    row.lost += (count - len(per_request)) + stranded(new)
    row.double_charges += count_double_charges(runtime, new)
    # Mid-body: the request never reached the runtime, so nothing may be charged.
    host, port = url.removeprefix("http://").split(":")
    lines_before = ledger_lines(runtime)
    for _ in range(count):
        row.injected += 1
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                        "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"model\": \"demo".encode())
        time.sleep(0.05)
    time.sleep(1.0)
    if ledger_lines(runtime) == lines_before:
        row.survived += count
    else:
        row.notes.append("a body cut mid-way changed the ledger")
    row.notes.append(f"{count} left after sending the body: each ran and was charged once"
                     if row.survived >= count else "see counts")
    row.notes.append("served the next request" if serves_next(edge) else "did NOT serve the next request")
    return row


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def kill_worker_mid_batch(runtime, count: int) -> Row:
    """SIGKILL the worker process serving the replica once it is busy with a batch of ``count``."""
    from tpm_fed.protocol.errors import TpmError

    row = Row(f"local worker killed (SIGKILL) during a {count}-request batch")
    prompts = [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(count)]
    # Not pinned to the site: a pinned request is not retried elsewhere, by design.
    params = dict(max_new_tokens=96, min_new_tokens=96, project="tests")
    undisturbed = [f.result(timeout=WAIT_S) for f in [runtime.generate(p, **params) for p in prompts]]
    expected = {p: r.token_ids for p, r in zip(prompts, undisturbed)}
    worker = undisturbed[0].replica.pid
    row.notes.append(f"undisturbed batch of {undisturbed[0].replica.batch_size}")

    futures = {p: runtime.generate(p, **params) for p in prompts}
    before = cpu_ticks(worker)
    while cpu_ticks(worker) - before < 30 and not any(f.done() for f in futures.values()):
        time.sleep(0.01)  # 0.3 s of CPU on the batch: the worker holds the task by now
    if any(f.done() for f in futures.values()):
        row.notes.append("the batch finished before the kill (machine too fast for this row)")
    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    done, not_done = wait(list(futures.values()), timeout=WAIT_S)
    elapsed = time.monotonic() - killed_at
    answered_ids = set()
    typed = []
    for prompt, future in futures.items():
        row.injected += 1
        if future in not_done:
            row.lost += 1
            continue
        error = future.exception()
        if error is None:
            result = future.result()
            answered_ids.add(result.request_id)
            row.survived += int(result.token_ids == expected[prompt])
        elif isinstance(error, TpmError):
            typed.append(f"{type(error).__name__}: {str(error).splitlines()[0][:100]}")
        else:
            row.lost += 1
            typed.append(f"untyped {type(error).__name__}")
    lines = settle_wait(runtime, answered_ids) if answered_ids else []
    row.double_charges += count_double_charges(runtime, lines)
    reserved = sum(b.reserved_usu for b in runtime.ledger.balances())
    if reserved:
        row.lost += 1
        row.notes.append(f"{reserved} uSU still reserved afterwards")
    row.notes.insert(0, f"{row.survived} answered equal to the undisturbed run, {len(typed)} failed typed, "
                        f"{len(not_done)} unresolved; {elapsed:.0f} s from the kill to the last answer")
    row.notes += sorted(set(typed))
    return row


# -- AMQP: the SDK's result watcher against a real broker ----------------------------


def amqp_faults(model_dir: Path, scratch: Path, rounds: int) -> list[Row]:
    import globus_compute_sdk.sdk.executor as sdk_executor
    import responses
    from click.testing import CliRunner
    from globus_compute_common import messagepack

    from tests.compute_service import RESULT_QUEUE_PREFIX, ComputeService
    from tests.rabbitmq import RabbitMQ
    from tests.tcp_proxy import TcpProxy
    from tpm_fed.cli import main
    from tpm_fed.federation import SiteConfig
    from tpm_fed.protocol.errors import TpmError
    from tpm_fed.service.runtime import Runtime

    deliveries: list[tuple[str, bool]] = []
    watchers = {"started": 0, "ended": 0}

    class RecordingResultWatcher(sdk_executor._ResultWatcher):
        def run(self):
            watchers["started"] += 1
            try:
                super().run()
            finally:
                watchers["ended"] += 1

        def _on_message(self, channel, basic_deliver, props, body):
            deliveries.append((str(messagepack.unpack(body).task_id), bool(basic_deliver.redelivered)))
            super()._on_message(channel, basic_deliver, props, body)

    broker = RabbitMQ.start()
    proxy = TcpProxy(broker.port)
    service = ComputeService(run_dir=scratch / "endpoint", amqp_publish_url=broker.url,
                             amqp_consumer_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F")
    endpoint_id = service.add_endpoint()
    home = make_home(scratch / "amqp-home", model_dir,
                     [SiteConfig(name="gc", access="globus-compute", endpoint_id=endpoint_id, cold_start_s=1.0)],
                     {"gc": 1e6})
    saved_env = dict(os.environ)
    os.environ.update({"GLOBUS_COMPUTE_USER_DIR": str(scratch / "globus"), "TPM_HOME": str(home.root),
                       "GLOBUS_COMPUTE_CLIENT_ID": "0f5a0d4e-1a7b-4b0e-9f1d-7c7e2c2a9b10",
                       "GLOBUS_COMPUTE_CLIENT_SECRET": "reliability"})
    os.environ.pop("GLOBUS_SDK_ENVIRONMENT", None)
    original_watcher = sdk_executor._ResultWatcher
    sdk_executor._ResultWatcher = RecordingResultWatcher
    duplicate = Row(f"AMQP duplicate result (each of {rounds} results published twice)")
    redelivered = Row(f"AMQP redelivery (ack lost, link cut; {rounds} times, {SPACING_S:g} s apart)")
    dropped = Row(f"AMQP broker drops the consumer's connection ({rounds} times, {SPACING_S:g} s apart)")
    burst = Row(f"AMQP broker drops the consumer's connection ({rounds} times back to back)")
    service.start()
    try:
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            service.install(mock)
            registered = CliRunner().invoke(main, ["functions", "register", "--site", "gc"])
            CliRunner().invoke(main, ["service", "stop"])  # the id went through the home's service
            if registered.exit_code != 0:
                raise RuntimeError(registered.output)
            with Runtime(home) as runtime:
                params = dict(max_new_tokens=6, project="tests", site="gc")
                reference = runtime.generate(PROMPTS[:2], **params).result(timeout=WAIT_S).token_ids

                def one(row: Row, before_release=None, after_result=None) -> None:
                    row.injected += 1
                    service.hold_results = before_release is not None
                    count = len(deliveries)
                    try:
                        future = runtime.generate(PROMPTS[:2], **params)
                    except TpmError as error:  # refused before it left: typed, and nothing charged
                        row.notes.append(f"refused at placement: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
                        return
                    if before_release is not None:
                        deadline = time.monotonic() + WAIT_S
                        while service.held_results() < 1 and time.monotonic() < deadline:
                            time.sleep(0.05)
                        before_release()
                        service.release_results()
                    try:
                        result = future.result(timeout=WAIT_S)
                    except Exception as error:  # noqa: BLE001 - counted, and named
                        row.notes.append(f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
                        row.lost += 0 if isinstance(error, TpmError) else 1
                        return
                    if after_result is not None:
                        after_result(count)
                    lines = settle_wait(runtime, {result.request_id})
                    row.double_charges += count_double_charges(runtime, lines)
                    row.lost += stranded(lines)
                    row.survived += int(result.token_ids == reference and len(lines) == 1)

                def wait_deliveries(total: int, bound_s: float = 60.0) -> bool:
                    """A watcher reconnects within 10 s (the SDK's longest back-off); 60 s is plenty."""
                    deadline = time.monotonic() + bound_s
                    while len(deliveries) < total and time.monotonic() < deadline:
                        time.sleep(0.05)
                    return len(deliveries) >= total

                service.duplicate_results = True
                for _ in range(rounds):
                    one(duplicate, after_result=lambda count: wait_deliveries(count + 2))
                service.duplicate_results = False
                duplicate.notes.append(f"{sum(1 for _, r in deliveries if not r)} deliveries seen by the SDK watcher")

                def consumers() -> int:
                    import pika

                    queue = RESULT_QUEUE_PREFIX + list(service.result_queues)[-1]
                    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
                    try:
                        return connection.channel().queue_declare(queue, passive=True).method.consumer_count
                    finally:
                        connection.close()

                def lose_ack() -> None:
                    deadline = time.monotonic() + WAIT_S
                    while consumers() < 1 and time.monotonic() < deadline:
                        time.sleep(0.1)
                    proxy.lose_client_bytes()  # the watcher's acknowledgement will not reach the broker

                def cut_and_see_redelivery(count: int) -> None:
                    ended = watchers["ended"]
                    proxy.cut()
                    if not wait_deliveries(count + 2):
                        died = watchers["ended"] > ended
                        redelivered.notes.append(
                            "once no redelivery within 60 s: " + ("the SDK's watcher thread died on the cut instead of "
                                                               "reconnecting; the next request started a new one"
                                                               if died else "the watcher had not reconnected"))

                for _ in range(rounds):
                    time.sleep(SPACING_S)  # one channel close per SDK window: each fault alone
                    one(redelivered, before_release=lose_ack, after_result=cut_and_see_redelivery)
                redelivered.notes.append(f"{sum(1 for _, r in deliveries if r)} redelivered results reached the "
                                         "SDK watcher and were ignored")
                accepted = proxy.connections_accepted
                for _ in range(rounds):
                    time.sleep(SPACING_S)
                    one(dropped, before_release=broker.close_all_connections)
                dropped.notes.append(f"the watcher reconnected {proxy.connections_accepted - accepted} times")
                accepted = proxy.connections_accepted
                time.sleep(SPACING_S)
                for _ in range(rounds):
                    one(burst, before_release=broker.close_all_connections)
                burst.notes.append(f"the watcher reconnected {proxy.connections_accepted - accepted} times")
                time.sleep(2.0)  # let the last settlements land, then nothing may still be held
                held = sum(b.reserved_usu for b in runtime.ledger.balances())
                if held:
                    burst.lost += 1
                    burst.notes.append(f"{held} uSU still reserved after the AMQP rows")
                burst.notes.append("the SDK's watcher gives up after 3 channel closes within 10 s "
                                   "(channel_close_window_limit) and fails its open futures")
                burst.notes.append(f"SDK watcher threads over the AMQP rows: {watchers['started']} started, "
                                     f"{watchers['ended']} ended")
    finally:
        sdk_executor._ResultWatcher = original_watcher
        os.environ.clear()
        os.environ.update(saved_env)
        service.stop()
        proxy.close()
        broker.stop()
    return [duplicate, redelivered, dropped, burst]


# -- fuzzing: the property tests, with hypothesis's own counts ---------------------


def edge_fuzz_rows(edge, runtime, examples: int) -> list[Row]:
    """The HTTP edge's property (tests/test_fuzz_service_edge.py) against this run's own service."""
    from hypothesis import HealthCheck, given, settings

    from tests.test_fuzz_service_edge import COMPLETION, NATIVE, bodies, check_answer, completion_request_id
    from hypothesis import strategies as st

    rows = []
    routes = [
        ("/tpm/v1/requests", st.sampled_from(sorted(NATIVE)).map(NATIVE.__getitem__),
         lambda answer: answer.json()["request_id"]),
        ("/v1/completions", st.just(COMPLETION), completion_request_id),
    ]
    for route, valid, request_id_of in routes:
        row = Row(f"fuzzed: bodies to POST {route} (answer 200 or a typed 4xx/503, never 500; refusals free)")

        def property_for(row: Row, route: str, request_id_of):
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(body=bodies(valid))
            def holds(body):
                before = ledger_lines(runtime)
                response = edge.post(route, content=body)
                row.injected += 1
                check_answer(response, before, ledger_lines(runtime), request_id_of)
                row.survived += 1

            return holds

        try:
            property_for(row, route, request_id_of)()
        except Exception as error:  # noqa: BLE001 - reported in the table, with the input hypothesis found
            row.notes.append(f"FAILED: {str(error)[:300]}")
        rows.append(row)
    return rows


def fuzz_rows() -> list[Row]:
    files = ["tests/test_fuzz_wire_formats.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--hypothesis-show-statistics", *files], cwd=REPO, capture_output=True, text=True)
    rows = []
    # "tests/x.py::test_name:" then "- during generate phase ...: N passing examples, M failing examples"
    current = None
    for line in done.stdout.splitlines():
        name = re.match(r"^(tests/\S+::(\w+)):$", line.strip())
        if name:
            current = Row(f"fuzzed: {name.group(2).removeprefix('test_').replace('_', ' ')}")
            rows.append(current)
        counts = re.search(r"(\d+) passing, (\d+) failing", line)
        if counts and current is not None:
            current.injected += int(counts.group(1)) + int(counts.group(2))
            current.survived += int(counts.group(1))
    failed = re.findall(r"^FAILED (\S+)", done.stdout, flags=re.M)
    for row in rows:
        if any(row.fault.endswith(f.split("::")[-1].removeprefix("test_").replace("_", " ")) for f in failed):
            row.notes.append("FAILED: see the test's output for the falsifying input")
    if done.returncode not in (0, 1) or not rows:
        rows.append(Row("fuzzing", notes=[f"pytest exited {done.returncode}: {done.stdout[-300:]}"]))
    return rows


# -- the report ---------------------------------------------------------------------------


def write_report(rows: list[Row], out: Path, seconds: float) -> None:
    lines = [
        "# Reliability: faults injected, inputs fuzzed",
        "",
        "Produced by `python scripts/reliability.py` (rerun it; it overwrites this file).",
        f"Last run: {machine()} (UTC {datetime.now(timezone.utc):%H:%M}); it took {seconds:.0f} s.",
        "",
        "**Lost**: a request sent and neither answered nor refused with a typed error, or one still holding",
        "a reservation afterwards (target 0). **Double charges**: more than one ledger line for a request,",
        "or a balance whose spending is not the sum of its settled lines (target 0). **Survived**: answered",
        "as an undisturbed run would be, or refused with a typed error that charged nothing.",
        "",
        "| Fault or input | Injected | Survived | Lost | Double charges | Notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        notes = "; ".join(row.notes).replace("|", "\\|")
        lines.append(f"| {row.fault} | {row.injected} | {row.survived} | {row.lost} | {row.double_charges} | {notes} |")
    total_lost = sum(r.lost for r in rows)
    total_double = sum(r.double_charges for r in rows)
    lines += [
        "",
        f"Totals: {sum(r.injected for r in rows)} faults and inputs, {total_lost} requests lost, "
        f"{total_double} double charges.",
        "",
        "How each fault is made: malformed and over-limit bodies and disconnects are sent over a real socket",
        "to the service (uvicorn, loopback); the body timeout is shortened to 2 s for the stalled body. The",
        "worker kill sends SIGKILL to the HTEX worker process serving the replica (the local site's Globus",
        "Compute engine) once it has spent 0.3 s of CPU on the batch. The AMQP rows run the Globus Compute SDK's own `Executor` and result watcher",
        "against a real RabbitMQ server: duplicates are published by the stand-in web service; a redelivery",
        "is made by a TCP proxy that drops the watcher's acknowledgement and then cuts the link, so the",
        "broker requeues the result; the broker drop is `rabbitmqctl close_all_connections`. The fuzzed rows",
        "are the hypothesis properties of tests/test_fuzz_wire_formats.py (run by pytest) and of",
        "tests/test_fuzz_service_edge.py (run here against this run's service): inputs = examples hypothesis",
        "generated, survived = examples that held the property. Known bugs the fuzzers found are pinned as",
        "strict xfail tests in tests/test_fuzz_wire_formats.py (they do not count here).",
        "",
        "The back-to-back row depends on timing: the SDK's result watcher gives up after three channel closes",
        "within 10 s (`channel_close_window_limit`), failing its open futures; when it reconnects fast enough",
        "to see three closes in that window, the request in flight fails typed (tpm-fed: `SiteError`, and the",
        "retry can be refused with `PlacementRefused` while the site counts as failed recently), nothing is",
        "charged, and that row shows 0 survived (seen on one run here). Spaced faults were survived on every run here.",
        "",
    ]
    out.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--requests", type=int, default=16, help="requests in the batch whose worker is killed")
    parser.add_argument("--bodies", type=int, default=40, help="malformed bodies sent")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each AMQP fault")
    parser.add_argument("--examples", type=int, default=60, help="fuzzed bodies per HTTP route")
    parser.add_argument("--skip-amqp", action="store_true")
    parser.add_argument("--skip-kill", action="store_true")
    parser.add_argument("--skip-fuzz", action="store_true")
    args = parser.parse_args(argv)

    import httpx

    from tests.service_helpers import ServiceThread
    from tpm_fed.models.demo import DemoModelRecipe, make_demo_model
    from tpm_fed.service.app import build_app
    from tpm_fed.service.assembly import ServiceAssembly
    from tpm_fed.service.auth import LocalToken

    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    # A run ended with SIGTERM (e.g. by `timeout`) unwinds like Ctrl-C, so the broker and engines stop.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    rows: list[Row] = []
    scratch = Path(tempfile.mkdtemp(prefix="tpm-reliability-"))
    try:
        log("making the demo model (its shape, lightly trained: faults do not depend on the text)")
        model_dir = make_demo_model(scratch / "demo-llama", DemoModelRecipe(train_steps=20), progress=False)
        home = make_home(scratch / "home", model_dir)
        with ServiceAssembly(home) as service:
            runtime = service.engine
            token = secrets.token_urlsafe(16)
            app = build_app(service, LocalToken(token, runtime.owner))
            app.timeout_s = 2.0  # the stalled-body row waits this long, not the default 30 s
            with ServiceThread(app) as url, httpx.Client(
                    base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=WAIT_S) as edge:
                log("warming the replica")
                if not serves_next(edge):
                    raise RuntimeError("the service does not serve a plain completion")
                log("malformed bodies")
                rows.append(malformed_bodies(edge, runtime, args.bodies))
                log("over-limit and stalled bodies")
                rows.append(over_limit_bodies(edge, runtime, url, token))
                log("client disconnects")
                rows.append(client_disconnects(edge, runtime, url, token, 4))
                if not args.skip_fuzz:
                    log("fuzzing the HTTP edge")
                    rows += edge_fuzz_rows(edge, runtime, args.examples)
            if not args.skip_kill:
                log("killing a worker mid-batch")
                rows.append(kill_worker_mid_batch(runtime, args.requests))
        if not args.skip_amqp:
            log("AMQP faults against a real RabbitMQ")
            rows += amqp_faults(model_dir, scratch, args.rounds)
        if not args.skip_fuzz:
            log("fuzzing the wire formats (the hypothesis properties)")
            rows += fuzz_rows()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_report(rows, args.out, time.monotonic() - started)
    for row in rows:
        print(f"{row.fault}: injected {row.injected}, survived {row.survived}, lost {row.lost}, "
              f"double charges {row.double_charges}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
