"""One caller's bad sampling values fail only their own request, and cost nothing (issue 24, defect 5).

The reproduction: ``seed: 2**80`` or ``temperature: 1e-320`` passed validation, then raised
inside the backend (torch's ``manual_seed`` overflows; logits divided by 1e-320 sample from NaN),
so the whole task failed: three requests of another user, batched with it, got 500s, and the
offender was charged nothing. Two defenses, each tested on its own:

- **The edge**: every sampling field has bounds in the contract
  (:mod:`tpm_fed.protocol.requests`), used by the OpenAI bodies too; a value out of them is a 400
  naming the field, and nothing is reserved or charged.
- **The worker**: a request sent past the edge (a direct worker call may carry anything) is parsed
  there with the same contract and refused alone; and one that makes the backend raise all the
  same is split off (:mod:`functions.isolation`): it fails typed and uncharged, its batch-mates are
  answered.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import httpx
import pytest

from tests.service_helpers import served_with_globus, token_answer
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.requests import GenerationRequest

CLIENT_ID, SECRET = "5b5b1a5e-0000-4000-8000-00000000d5e5", "service-secret"
ANA, BO = "ana@uchicago.edu", "bo@anl.gov"  # ana sends good requests; bo sends one bad one
BAD_VALUES = [("seed", 2**80), ("seed", 2**63), ("temperature", 1e-320), ("temperature", 0.001)]
PROMPTS = ["The cell divides", "A star is born", "The river carries"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, demo_model_dir):
    """A shared service (Globus identities) whose one worker gathers what arrives within a second
    into one task, so ana's requests and bo's travel together."""
    from tpm_fed.service.assembly import ServiceAssembly

    home = TpmHome(tmp_path_factory.mktemp("bad-sampling-home"))
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    Federation(
        name="bad-sampling",
        sites=[SiteConfig(name="local", batch_linger_ms=1000)],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch")],
        projects=[ProjectConfig(name="astro", members=[ANA], allocations={"local": 100.0}),
                  ProjectConfig(name="bio", members=[BO], allocations={"local": 100.0})],
    ).dump(home.federation_file)
    tokens = {"ana-token": token_answer(ANA, CLIENT_ID), "bo-token": token_answer(BO, CLIENT_ID)}
    with ServiceAssembly(home) as assembly, served_with_globus(assembly, CLIENT_ID, SECRET, tokens) as (url, _, _):
        runtime = assembly.engine
        yield url, runtime


def _post(url: str, token: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)


EDGE_CASES = [
    ("/v1/completions", {"model": DEMO_MODEL_NAME, "prompt": "The cell", "max_tokens": 2}),
    ("/v1/chat/completions", {"model": DEMO_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 2}),
    ("/tpm/v1/requests", {"kind": "generate", "model": {"name": DEMO_MODEL_NAME}, "prompts": ["The cell"],
                          "max_new_tokens": 2}),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
@pytest.mark.parametrize("path,body", EDGE_CASES, ids=[path for path, _ in EDGE_CASES])
def test_a_sampling_value_out_of_bounds_is_a_400_naming_the_field_and_costs_nothing(shared, path, body,
                                                                                     field, value):
    url, runtime = shared
    before = runtime.ledger.statement()
    answer = _post(url, "bo-token", path, {**body, "temperature": 0.8, field: value})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "InvalidRequest" and field in error["message"], error
    assert runtime.ledger.statement() == before  # nothing reserved, nothing charged


@pytest.mark.parametrize("field,value", [("seed", 2**80), ("temperature", 1e-320)])
def test_a_bad_request_past_the_edge_fails_alone_and_its_batch_mates_are_answered(shared, field, value):
    """Bo's request goes straight to the runtime (as a direct worker call could, past the HTTP edge),
    while ana's three arrive over HTTP; the four leave as one task."""
    url, runtime = shared
    good = GenerationRequest.create("The sky", DEMO_MODEL_NAME, temperature=0.8, max_new_tokens=4)
    bad = good.model_copy(update={field: value})  # model_copy does not validate: the edge never saw it
    answers: list[httpx.Response] = []

    def ask(prompt: str) -> None:
        answers.append(_post(url, "ana-token", "/v1/completions", {
            "model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0}))

    bad_future = runtime.submit(bad, BO)
    callers = [threading.Thread(target=ask, args=(prompt,)) for prompt in PROMPTS]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=180)

    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    tasks = {(a.json()["tpm"]["replica"], a.json()["tpm"]["request_id"]) for a in answers}
    assert len({replica for replica, _ in tasks}) == 1
    with pytest.raises(InvalidRequest, match=field):
        bad_future.result(timeout=60)
    charges = {c.request_id: c for c in runtime.ledger.statement()}
    offender = charges[bad.request_id]  # reserved when its batch left, then released: it cost nothing
    assert (offender.identity, offender.state, offender.charged_usu) == (BO, "released", 0)
    assert all(charges[rid].state == "settled" and charges[rid].identity == ANA for _, rid in tasks)


# ----- the worker on its own: the serving function's `answer`, on a real backend in this process --------


@pytest.fixture(scope="module")
def torch_backend(demo_model_dir):
    from functions.backends.torch_backend import TorchBackend
    from tpm_fed.protocol.model import ModelSpec

    return TorchBackend.load(ModelSpec(name=DEMO_MODEL_NAME, version="v", path=str(demo_model_dir), backend="torch"))


def _wire(prompt: str, **fields) -> dict:
    return GenerationRequest.create(prompt, DEMO_MODEL_NAME, max_new_tokens=6, **fields).to_wire()


def _texts(outcomes: list[dict]) -> list[str]:
    return [outcome["result"]["completions"][0]["text"] for outcome in outcomes]


@pytest.mark.parametrize("field,value", [("seed", 2**80), ("temperature", 1e-320)])
def test_the_worker_refuses_a_bad_value_alone_and_answers_the_rest(torch_backend, field, value):
    from functions.policy import current_policy
    from functions.serve import answer

    good = [_wire(prompt) for prompt in PROMPTS]
    bad = {**_wire("The sky", temperature=0.8), field: value}  # a direct worker call may send anything
    outcomes = answer(torch_backend, [*good, bad], current_policy())
    assert outcomes[-1]["error"]["type"] == "InvalidRequest" and field in outcomes[-1]["error"]["message"]
    assert _texts(outcomes[:3]) == _texts(answer(torch_backend, good, current_policy()))


class RaisesOnOnePrompt:
    """The torch backend, except that a batch holding the prompt ``poison`` raises inside ``generate``:
    a fault no validation foresaw, where the real backend's batch call fails."""

    def __init__(self, backend) -> None:
        self.backend, self.name, self.context_length = backend, backend.name, backend.context_length
        self.calls: list[int] = []

    def encode(self, request):
        return self.backend.encode(request)

    def generate(self, batch, channel=None):
        self.calls.append(len(batch))
        if any("poison" in item.request.prompts for item in batch):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return self.backend.generate(batch, channel)

    def close(self) -> None:
        pass


def test_a_request_that_makes_the_backend_raise_fails_alone_typed_and_the_rest_are_answered(torch_backend):
    from functions.policy import current_policy
    from functions.serve import answer

    faulty = RaisesOnOnePrompt(torch_backend)
    good = [_wire(prompt) for prompt in [*PROMPTS, "The telescope", "A cell"]]
    wires = [*good[:3], _wire("poison"), *good[3:]]
    outcomes = answer(faulty, wires, current_policy())
    failed = outcomes[3]["error"]
    assert failed["type"] == "RemoteExecutionError" and "RuntimeError" in failed["message"], failed
    assert "inf" not in failed["message"]  # the exception's text stays in the worker's log
    assert "not charged" in failed["message"]
    assert _texts(outcomes[:3] + outcomes[4:]) == _texts(answer(torch_backend, good, current_policy()))
    assert len(faulty.calls) < 1 + len(wires)  # found by halving, not by running each request alone again


def test_the_contract_bounds_every_sampling_field():
    from tpm_fed.protocol.requests import MAX_NEW_TOKENS, MAX_SEED, MIN_TEMPERATURE

    GenerationRequest.create("x", "m", seed=MAX_SEED, temperature=MIN_TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS)
    GenerationRequest.create("x", "m", temperature=0.0)  # greedy
    for fields, named in [({"seed": MAX_SEED + 1}, "seed"), ({"temperature": MIN_TEMPERATURE / 2}, "temperature"),
                          ({"temperature": 2.5}, "temperature"), ({"max_new_tokens": MAX_NEW_TOKENS + 1},
                                                                  "max_new_tokens")]:
        with pytest.raises(InvalidRequest, match=named):
            GenerationRequest.create("x", "m", **fields)


# ----- the same on vLLM (installed by the README's test command) ------------------------------------------


@pytest.fixture(scope="module")
def vllm_backend(demo_model_dir):
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install-vllm.sh cpu installs it)")
    from functions.backends.vllm_backend import VllmBackend
    from tpm_fed.protocol.model import ModelSpec

    backend = VllmBackend.load(ModelSpec(name=DEMO_MODEL_NAME, version="v", path=str(demo_model_dir),
                                         backend="vllm", dtype="float32"))
    yield backend
    backend.close()


def test_on_vllm_a_bad_seed_fails_alone_and_the_engine_serves_on(vllm_backend):
    from functions.policy import current_policy
    from functions.serve import answer

    good = [_wire(prompt) for prompt in PROMPTS]
    outcomes = answer(vllm_backend, [*good, {**_wire("The sky", temperature=0.8), "seed": 2**80}], current_policy())
    assert outcomes[-1]["error"]["type"] == "InvalidRequest" and "seed" in outcomes[-1]["error"]["message"]
    assert _texts(outcomes[:3]) == _texts(answer(vllm_backend, good, current_policy()))


class FailsAfterFirstStep:
    """A running batch's hooks (:class:`functions.joining.JoinableTask`) whose first send raises: a fault
    in the middle of a live batch, with its rows still in the engine."""

    cancelled: set[str] = set()

    def started(self, item) -> None:
        pass

    def joined(self) -> list:
        return []

    def close(self) -> list:
        return []

    def finished(self, item, completions) -> None:
        pass

    def send(self, chunks) -> None:
        raise RuntimeError("the back channel broke mid-batch")


def test_on_vllm_a_batch_that_raises_mid_run_leaves_nothing_in_the_engine(vllm_backend):
    """The worker answers a failed batch's requests again, apart: rows the failed run left in the engine
    would be stepped by that next call, and vLLM's own generate then fails on their ids (every later
    batch with it)."""
    items = [vllm_backend.encode(GenerationRequest.create(p, DEMO_MODEL_NAME, max_new_tokens=8)) for p in PROMPTS]
    with pytest.raises(RuntimeError, match="mid-batch"):
        vllm_backend.generate(items, FailsAfterFirstStep())
    again = vllm_backend.generate(items)
    assert [c[0].token_ids for c in again] == [c[0].token_ids for c in vllm_backend.generate(items)]
    assert not vllm_backend.llm.llm_engine.has_unfinished_requests()
