"""A share of a vLLM replica's engine kept for interactive work.

The worker's live step loop (``VllmBackend._run_live``) holds the task's batch lines beyond the cap
(:mod:`functions.batch_rows`); they enter as batch rows end, each answered once with the tokens
``vllm.LLM.generate`` gives alone. Interactive rows enter at once. The cap is the endpoint's
``TPM_BATCH_ROWS`` (a local site's ``worker.batch_rows``); a bad one is refused by name.

While an interactive row is in the engine, its scheduler (:mod:`functions.backends.interactive_first`)
leaves the batch rows beyond ``TPM_BATCH_ROWS_BESIDE_INTERACTIVE`` (``worker.batch_rows_beside_interactive``;
on a CPU 0 by default) out of its steps, and admits no waiting batch line: they keep their place and their
KV cache, and end with the tokens ``vllm.LLM.generate`` gives alone.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from functions.policy import load_policy
from tpm_fed.federation import Federation, SiteConfig
from tpm_fed.protocol.errors import FederationConfigError, SiteError
from tpm_fed.protocol.generation import BATCH_PRIORITY

MODEL = "demo-llama"


def test_the_cap_is_the_endpoints_and_a_bad_one_is_refused_by_name(tmp_path):
    assert load_policy({}).batch_rows is None  # no cap by default
    assert load_policy({"TPM_BATCH_ROWS": "4"}).batch_rows == 4
    for bad in ("0", "-2", "many"):
        with pytest.raises(SiteError, match="TPM_BATCH_ROWS"):
            load_policy({"TPM_BATCH_ROWS": bad})
    assert load_policy({}).batch_rows_beside_interactive is None  # the engine's default (paused_beyond)
    assert load_policy({"TPM_BATCH_ROWS_BESIDE_INTERACTIVE": "0"}).batch_rows_beside_interactive == 0
    for bad in ("-1", "some"):
        with pytest.raises(SiteError, match="TPM_BATCH_ROWS_BESIDE_INTERACTIVE"):
            load_policy({"TPM_BATCH_ROWS_BESIDE_INTERACTIVE": bad})
    assert load_policy({}).batch_tokens_after_interactive is None  # the engine's default (tokens_after)
    assert load_policy({"TPM_BATCH_TOKENS_AFTER_INTERACTIVE": "32"}).batch_tokens_after_interactive == 32
    for bad in ("0", "few"):
        with pytest.raises(SiteError, match="TPM_BATCH_TOKENS_AFTER_INTERACTIVE"):
            load_policy({"TPM_BATCH_TOKENS_AFTER_INTERACTIVE": bad})
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("batch_rows: 0\n")
    with pytest.raises(SiteError, match="batch_rows"):
        load_policy({"TPM_WORKER_POLICY": str(policy_file)})


def test_a_local_sites_cap_reaches_its_workers_and_a_bad_one_is_refused(tmp_path):
    from tpm_fed.sites.local import LocalSite

    capped = SiteConfig.model_validate({"name": "local", "worker": {"batch_rows": 8}})
    assert "export TPM_BATCH_ROWS=8" in LocalSite.from_config(capped, tmp_path).worker_init().splitlines()
    # Unset (no cap) is said explicitly too, so the service's own environment does not leak into its workers.
    assert "unset TPM_BATCH_ROWS" in LocalSite.from_config(SiteConfig(name="local"), tmp_path).worker_init()
    yielding = SiteConfig.model_validate({"name": "local", "worker": {"batch_rows_beside_interactive": 0}})
    lines = LocalSite.from_config(yielding, tmp_path).worker_init().splitlines()
    assert "export TPM_BATCH_ROWS_BESIDE_INTERACTIVE=0" in lines and "unset TPM_BATCH_ROWS" in lines
    assert "unset TPM_BATCH_ROWS_BESIDE_INTERACTIVE" in LocalSite.from_config(capped, tmp_path).worker_init()
    short = SiteConfig.model_validate({"name": "local", "worker": {"batch_tokens_after_interactive": 32}})
    assert "export TPM_BATCH_TOKENS_AFTER_INTERACTIVE=32" in LocalSite.from_config(short, tmp_path).worker_init()
    assert "unset TPM_BATCH_TOKENS_AFTER_INTERACTIVE" in LocalSite.from_config(capped, tmp_path).worker_init()
    path = tmp_path / "federation.yaml"
    path.write_text("name: f\nsites:\n  - name: local\n    worker: {batch_rows: 0}\nmodels: []\nprojects: []\n")
    with pytest.raises(FederationConfigError, match="batch_rows"):
        Federation.load(path)


@settings(max_examples=200, deadline=None)
@given(cap=st.integers(1, 6), requests=st.lists(st.tuples(st.booleans(), st.integers(1, 8)), max_size=30),
       order=st.randoms(use_true_random=False))
def test_the_share_never_lets_more_than_k_batch_rows_in_and_every_request_enters_in_order(cap, requests, order):
    """The worker's bookkeeping alone, against random arrivals and endings: the batch rows in the engine never
    exceed K (a request larger than K enters alone), batch lines enter in the order they came, and every
    request enters once."""
    from functions.batch_rows import BatchRows

    share = BatchRows(cap, lambda r: r[2], lambda r: r[1])
    in_engine: list[list] = []  # [request, rows still running]
    entered: list[tuple] = []

    def enter(request):
        entered.append(request)
        in_engine.append([request, request[2]])
        batch = [left for r, left in in_engine if r[1]]
        assert sum(batch) <= cap or len(batch) == 1  # one larger than K runs alone

    pending = [(index, batch, rows) for index, (batch, rows) in enumerate(requests)]
    while pending or in_engine or share.held:
        if pending and (not in_engine or order.random() < 0.5):
            request = pending.pop(0)
            if share.enter(request):
                enter(request)
        else:
            running = order.choice(in_engine)
            running[1] -= 1
            share.row_ended(running[0])
            if running[1] == 0:
                in_engine.remove(running)
        for request in share.ready():
            enter(request)
    assert sorted(entered) == sorted((i, b, r) for i, (b, r) in enumerate(requests))
    batch_order = [r[0] for r in entered if r[1]]
    assert batch_order == sorted(batch_order)
    assert share.in_engine == 0


vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install-vllm.sh cpu installs it)")

from tests import test_vllm_backend  # noqa: E402
from tests.test_vllm_backend import Collected, direct_greedy  # noqa: E402

oracle = test_vllm_backend.direct_llm  # its fixture (vllm.LLM in this process on the demo model), here too


class Watched(Collected):
    """A live task that notes when each request entered the engine and how often each was answered."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.started_at: dict[str, int] = {}
        self.answered: list[str] = []

    def started(self, item) -> None:
        self.started_at[item.request.request_id] = len(self.sends)

    def finished(self, item, completions) -> None:
        super().finished(item, completions)
        self.answered.append(item.request.request_id)


@pytest.fixture
def engine_rows(oracle, monkeypatch):
    """The rows in the engine before each of its steps (the engine's own unfinished request count)."""
    engine = oracle.llm_engine
    counts: list[int] = []
    step = engine.step

    def counted():
        counts.append(engine.get_num_unfinished_requests())
        return step()

    monkeypatch.setattr(engine, "step", counted)
    return counts


def backend_with_cap(llm, cap):
    from functions.backends.vllm_backend import VllmBackend

    return VllmBackend(llm, 256, torch_threads_before=1, batch_rows=cap)


def line(prompt, tokens: int, **fields):
    from tpm_fed.protocol.requests import GenerationRequest

    return GenerationRequest.create(prompt, MODEL, max_new_tokens=tokens, priority=BATCH_PRIORITY, **fields)


def test_at_most_k_batch_rows_run_and_every_held_line_is_answered_once_as_vllm_would(oracle, engine_rows):
    backend = backend_with_cap(oracle, 2)
    lines = [line(p, n) for p, n in (("The cell", 3), ("The river carries", 9), ("A star", 5),
                                     ("Water", 7), ("The detector counts", 4))]
    lines.append(line(["The galaxy contains", "An allocation"], 6))  # two rows: enters when both fit
    live = Watched()
    answers = backend.generate([backend.encode(r) for r in lines], live)
    assert engine_rows and max(engine_rows) == 2  # never more than the cap, and the cap was used
    assert sorted(live.answered) == sorted(r.request_id for r in lines)  # each answered, once
    assert [live.started_at[r.request_id] for r in lines[:2]] == [0, 0]
    assert all(live.started_at[r.request_id] > 0 for r in lines[2:])  # held, entered as rows ended
    for request, answer in zip(lines, answers, strict=True):
        expected = direct_greedy(oracle, request.prompts, request.max_new_tokens)
        assert [c.token_ids for c in answer] == expected
        assert [c.token_ids for c in live.answers[request.request_id]] == expected


def test_interactive_rows_enter_at_once_past_held_batch_lines(oracle, engine_rows):
    from tpm_fed.protocol.requests import GenerationRequest

    backend = backend_with_cap(oracle, 1)
    lines = [line(p, 12, min_new_tokens=12) for p in ("The cell", "The river carries", "A star")]
    interactive = GenerationRequest.create("The telescope", MODEL, max_new_tokens=4, min_new_tokens=4)
    live = Watched(joining=[backend.encode(interactive)], join_after=2)
    backend.generate([backend.encode(r) for r in lines], live)
    assert max(engine_rows) == 2  # one batch row, plus the interactive one
    assert live.started_at[interactive.request_id] == 2  # at the step it joined, while two lines wait
    assert live.started_at[lines[1].request_id] > live.started_at[interactive.request_id]
    assert live.answers[interactive.request_id][0].token_ids == direct_greedy(oracle, interactive.prompts, 4)[0]
    assert live.finished_at[interactive.request_id] < live.finished_at[lines[1].request_id]


def test_a_held_line_whose_caller_left_is_answered_once_with_nothing_made(oracle, engine_rows):
    backend = backend_with_cap(oracle, 1)
    running, held = line("The river carries", 16, min_new_tokens=16), line("A star", 16, min_new_tokens=16)
    live = Watched(cancel_after=2, cancel=held.request_id)
    answers = backend.generate([backend.encode(running), backend.encode(held)], live)
    assert live.answered.count(held.request_id) == 1 and held.request_id not in live.started_at  # never ran
    assert [(c.token_ids, c.text, c.finish_reason) for c in answers[1]] == [([], "", "length")]
    assert answers[1] == live.answers[held.request_id]
    assert answers[0][0].token_ids == direct_greedy(oracle, running.prompts, 16)[0]  # its mate unchanged
    assert max(engine_rows) == 1


def direct(llm, request):
    """``request`` alone through ``vllm.LLM.generate``: token ids (without a final end-of-sequence) and text."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=request.max_new_tokens, min_tokens=request.min_new_tokens,
                            temperature=request.temperature, seed=request.seed, stop=request.stop or None)
    eos = llm.get_tokenizer().eos_token_id
    out = llm.generate(request.prompts, params, use_tqdm=False)[0].outputs[0]
    return [t for t in out.token_ids if t != eos], out.text


def interactive_steps(live, request) -> range:
    """The engine steps an interactive request was in (``engine_rows`` is counted before each step)."""
    return range(live.started_at[request.request_id], live.finished_at[request.request_id] + 1)


def recorded(oracle, monkeypatch, measure) -> list[int]:
    """``measure`` of each step the engine's scheduler makes, in order."""
    scheduler = oracle.llm_engine.engine_core.engine_core.scheduler
    counts: list[int] = []
    schedule = scheduler.schedule

    def counted(*args, **kwargs):
        output = schedule(*args, **kwargs)
        counts.append(measure(output))
        return output

    monkeypatch.setattr(scheduler, "schedule", counted)
    return counts


@pytest.fixture
def scheduled(oracle, monkeypatch):
    """The rows the engine's scheduler put in each of its steps."""
    return recorded(oracle, monkeypatch, lambda output: len(output.num_scheduled_tokens))


@pytest.fixture
def scheduled_tokens(oracle, monkeypatch):
    """The tokens the engine's scheduler put in each of its steps."""
    return recorded(oracle, monkeypatch, lambda output: output.total_num_scheduled_tokens)


@pytest.fixture
def pausing(oracle):
    """Set the oracle's scheduler to keep K batch rows beside interactive ones, and at most T tokens a step
    for batch rows just after them (plain vLLM again after)."""
    scheduler = oracle.llm_engine.engine_core.engine_core.scheduler

    def keep(beyond, tokens_after=None):
        scheduler.paused_beyond, scheduler.tokens_after = beyond, tokens_after
        return scheduler

    yield keep
    scheduler.paused_beyond = scheduler.tokens_after = None


def run_beside(oracle, lines, interactive, join_after):
    from functions.backends.vllm_backend import VllmBackend

    backend = VllmBackend(oracle, 256, torch_threads_before=1)
    live = Watched(joining=[backend.encode(interactive)], join_after=join_after)
    answers = backend.generate([backend.encode(r) for r in lines], live)
    return live, answers


def interactive_request(tokens):
    from tpm_fed.protocol.requests import GenerationRequest

    return GenerationRequest.create("The telescope", MODEL, max_new_tokens=tokens, min_new_tokens=tokens)


def test_batch_rows_sit_out_an_interactive_rows_steps_and_end_as_vllm_gives_them_alone(
        oracle, engine_rows, scheduled, pausing):
    """Greedy, seeded-sampled and stop-string lines all pause (none leaves the engine: the rows in it never
    drop), the interactive row steps alone, and each line's tokens and text are vLLM's alone."""
    pausing(0)
    lines = [line("The cell", 20, min_new_tokens=20), line("The river carries", 20, min_new_tokens=20),
             line("A star", 3, min_new_tokens=3), line("Water flows", 16, min_new_tokens=16, temperature=0.9, seed=7),
             line("The detector counts", 16, min_new_tokens=16, stop=["zzzz"])]
    interactive = interactive_request(5)
    live, answers = run_beside(oracle, lines, interactive, join_after=4)
    assert scheduled[:4] == [5, 5, 5, 4]  # "A star" made its 3 tokens
    steps = interactive_steps(live, interactive)
    assert [scheduled[step] for step in steps] == [1] * 5  # alone, 5 tokens
    assert [engine_rows[step] for step in steps] == [5] * 5  # the 4 lines still in (the short one ended)
    assert scheduled[steps[-1] + 1] == 4  # then they step again
    assert sorted(live.answered) == sorted(r.request_id for r in lines + [interactive])  # each answered once
    for request, answer in zip(lines, answers, strict=True):
        (completion,) = answer
        assert (completion.token_ids, completion.text) == direct(oracle, request)
        assert live.answers[request.request_id] == answer
    assert live.answers[interactive.request_id][0].token_ids == direct(oracle, interactive)[0]


def test_k_batch_rows_stay_beside_an_interactive_row_and_without_a_share_all_do(oracle, scheduled, pausing):
    lines = [line(p, 20, min_new_tokens=20) for p in ("The cell", "The river carries", "Water flows")]
    pausing(1)
    interactive = interactive_request(4)
    live, _ = run_beside(oracle, lines, interactive, join_after=3)
    assert {scheduled[step] for step in interactive_steps(live, interactive)} == {2}  # the oldest line, and it
    pausing(None)  # plain vLLM: every running row shares the interactive row's steps
    scheduled.clear()
    interactive = interactive_request(4)
    live, _ = run_beside(oracle, [line(p, 20, min_new_tokens=20) for p in ("The cell", "A star")], interactive, 3)
    assert {scheduled[step] for step in interactive_steps(live, interactive)} == {3}


def test_a_long_interactive_row_slows_the_batch_but_every_few_steps_one_takes_every_row(oracle, scheduled, pausing):
    """A steady stream of interactive work must not stop a batch (its task would time out): after
    ``most_steps_paused`` steps sat out, one step takes every row."""
    scheduler = pausing(0)
    scheduler.most_steps_paused = 3
    try:
        lines = [line(p, 30, min_new_tokens=30) for p in ("The cell", "A star")]
        interactive = interactive_request(12)
        live, answers = run_beside(oracle, lines, interactive, join_after=2)
    finally:
        scheduler.most_steps_paused = type(scheduler).most_steps_paused
    assert [scheduled[step] for step in interactive_steps(live, interactive)] == [1, 1, 1, 3] * 3
    for request, answer in zip(lines, answers, strict=True):
        assert answer[0].token_ids == direct(oracle, request)[0]


def test_no_batch_line_is_admitted_while_an_interactive_row_runs(oracle, scheduled, pausing):
    from functions.backends.vllm_backend import VllmBackend

    pausing(0)
    backend = VllmBackend(oracle, 256, torch_threads_before=1)
    interactive = interactive_request(6)
    joining = [line(p, 4, min_new_tokens=4) for p in ("The cell", "A star")]
    live = Watched(joining=[backend.encode(r) for r in joining], join_after=2)
    backend.generate([backend.encode(interactive)], live)
    assert scheduled[:6] == [1] * 6  # the lines joined at step 2, and waited for its last token
    assert scheduled[6] == 2
    for request in joining:
        assert live.answers[request.request_id][0].token_ids == direct(oracle, request)[0]


def test_batch_steps_stay_short_just_after_an_interactive_row_and_answers_stay_vllms_alone(
        oracle, scheduled_tokens, pausing, monkeypatch):
    """The next interactive request waits for the step in flight: for ``RECENT_S`` after one, a step gives
    the batch rows at most ``tokens_after`` tokens (vLLM leaves the other rows out), later every row again."""
    from functions.backends import interactive_first

    pausing(0, tokens_after=3)
    monkeypatch.setattr(interactive_first, "RECENT_S", 60.0)
    prompts = ("The cell", "The river carries", "A star", "Water flows", "The detector counts", "The sun")
    lines = [line(p, 12, min_new_tokens=12) for p in prompts]
    interactive = interactive_request(2)
    live, answers = run_beside(oracle, lines, interactive, join_after=2)
    after = scheduled_tokens[interactive_steps(live, interactive)[-1] + 1:]
    assert max(after) == 3 and len(after) >= 6 * 10 // 3  # the lines' last 10 tokens or more, 3 a step
    for request, answer in zip(lines, answers, strict=True):
        assert answer[0].token_ids == direct(oracle, request)[0]
    monkeypatch.setattr(interactive_first, "RECENT_S", 0.0)  # long past: every row steps again
    scheduled_tokens.clear()
    interactive = interactive_request(2)
    live, _ = run_beside(oracle, [line(p, 12, min_new_tokens=12) for p in prompts], interactive, join_after=2)
    assert max(scheduled_tokens[interactive_steps(live, interactive)[-1] + 1:]) == 6


def test_nothing_is_paused_when_the_kv_cache_is_nearly_full(oracle, scheduled, pausing, monkeypatch):
    """Paused rows hold KV blocks the interactive rows may need: near full, vLLM's own preemption decides."""
    from functions.backends import interactive_first

    scheduler = pausing(0)
    monkeypatch.setattr(type(scheduler.kv_cache_manager), "usage",
                        property(lambda _: interactive_first.FULL_CACHE + 0.01))
    interactive = interactive_request(4)
    live, _ = run_beside(oracle, [line(p, 20, min_new_tokens=20) for p in ("The cell", "A star")], interactive, 3)
    assert {scheduled[step] for step in interactive_steps(live, interactive)} == {3}


def test_a_cpu_replica_pauses_every_batch_row_by_default_a_gpu_one_none_and_a_sites_number_stands():
    from vllm.platforms import current_platform

    from functions.backends.interactive_first import TOKENS_AFTER_ON_CPU, paused_beyond, tokens_after

    assert paused_beyond(None) == (0 if current_platform.is_cpu() else None)
    assert paused_beyond(3) == 3 and paused_beyond(0) == 0
    assert tokens_after(None) == (TOKENS_AFTER_ON_CPU if current_platform.is_cpu() else None)
    assert tokens_after(16) == 16


def test_steps_are_not_shortened_where_vllm_would_not_prefill_a_long_prompt_in_chunks(monkeypatch):
    """Without chunked prefill a prompt longer than the short budget could never be scheduled while
    interactive requests keep coming: the setting is then left off."""
    from types import SimpleNamespace

    from vllm.v1.core.sched.request_queue import SchedulingPolicy
    from vllm.v1.core.sched.scheduler import Scheduler

    from functions.backends.interactive_first import InteractiveFirst

    def bare(self, chunked):  # only what InteractiveFirst reads of vLLM's own start
        self.policy = SchedulingPolicy.PRIORITY
        self.scheduler_config = SimpleNamespace(enable_chunked_prefill=chunked)

    monkeypatch.setattr(Scheduler, "__init__", bare)
    monkeypatch.setenv("TPM_BATCH_TOKENS_AFTER_INTERACTIVE", "24")
    assert InteractiveFirst(True).tokens_after == 24
    assert InteractiveFirst(False).tokens_after is None


# Last: it starts and closes an engine of its own, which takes down vLLM's process state the oracle uses.
def test_a_replica_takes_its_cap_from_the_endpoints_policy_and_leaves_the_serving_a_core(demo_model_dir,
                                                                                           monkeypatch):
    """The loader as a worker calls it: the policy's cap and batch tokens after interactive rows, the engine's
    torch threads as vLLM's own server sets its worker's on a CPU (every physical core but one: on two cores,
    one thread, not two), and a step's rows and tokens as that server sizes them."""
    import torch

    from functions.backends.cpu_threads import physical_cores
    from functions.backends.vllm_backend import VllmBackend
    from tpm_fed.protocol.model import ModelSpec

    monkeypatch.setenv("TPM_BATCH_ROWS", "3")
    monkeypatch.setenv("TPM_BATCH_TOKENS_AFTER_INTERACTIVE", "24")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("TPM_STEP_TOKENS", raising=False)
    backend = VllmBackend.load(ModelSpec(name=MODEL, version="v", path=str(demo_model_dir), backend="vllm"))
    try:
        assert backend.batch_rows == 3
        scheduler = backend.llm.llm_engine.engine_core.engine_core.scheduler
        # A step's rows as vLLM's own OpenAI server sizes them here (vllm.LLM's are offline sizes), and its
        # tokens too but on a CPU, where a step holds 512 (functions/backends/step_size.py).
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext

        tokens, rows = EngineArgs.get_batch_defaults(1)
        config = scheduler.scheduler_config
        assert (config.max_num_seqs, config.max_num_batched_tokens) == (
            rows[UsageContext.OPENAI_API_SERVER],
            tokens[UsageContext.OPENAI_API_SERVER] if torch.cuda.is_available() else 512)
        assert type(scheduler).__name__ == "InteractiveFirst"
        assert scheduler.paused_beyond == (0 if not torch.cuda.is_available() else None)  # the platform's default
        assert scheduler.tokens_after == 24  # the endpoint's, read when the engine starts
        assert torch.get_num_threads() == max(1, physical_cores(os.sched_getaffinity(0)) - 1)
    finally:
        backend.close()
