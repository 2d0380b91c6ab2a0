"""How many tokens one step of a replica's vLLM engine holds (:mod:`functions.backends.step_size`).

On a CPU a step holds at most 512 tokens unless the site says otherwise, so a burst of prompts is
prefilled over several short steps; vLLM's own server's rows stand. Where chunked prefill is off
(an encoder-decoder), vLLM sizes the step itself. The setting is the endpoint's ``TPM_STEP_TOKENS``
(a site's ``worker.step_tokens``); a bad one is refused by name. The loader's engine is checked in
``tests/test_batch_rows.py`` (its last test starts one), and the tokens it answers with a burst split
over steps in ``tests/test_vllm_backend.py``.
"""

from __future__ import annotations

import json

import pytest

from functions.policy import load_policy
from tpm_fed.federation import Federation, SiteConfig
from tpm_fed.protocol.errors import FederationConfigError, SiteError

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install-vllm.sh cpu installs it)")


def server_sizes(world_size: int = 1) -> tuple[int, int]:
    """vLLM's own OpenAI server's (tokens, rows) a step on this hardware."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    tokens, rows = EngineArgs.get_batch_defaults(world_size)
    return tokens[UsageContext.OPENAI_API_SERVER], rows[UsageContext.OPENAI_API_SERVER]


def model_dir(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **config}))
    return folder


def test_a_cpu_replica_steps_512_tokens_with_the_servers_rows(tmp_path):
    from vllm.platforms import current_platform

    from functions.backends.step_size import STEP_TOKENS_ON_CPU, step_limits

    tokens, rows = server_sizes()
    limits = step_limits(1, model_dir(tmp_path), None)
    if current_platform.is_cpu():
        assert STEP_TOKENS_ON_CPU == 512 < tokens
        assert limits == {"max_num_batched_tokens": 512, "max_num_seqs": rows}
    else:  # a GPU keeps vLLM's own server's sizes
        assert limits == {"max_num_batched_tokens": tokens, "max_num_seqs": rows}


def test_the_sites_number_stands_and_a_step_never_holds_more_rows_than_tokens(tmp_path):
    from functions.backends.step_size import step_limits

    _, rows = server_sizes()
    assert step_limits(1, model_dir(tmp_path), 1024) == {"max_num_batched_tokens": 1024, "max_num_seqs": rows}
    # vLLM refuses to start with more rows than tokens a step: the rows follow a small budget down.
    assert step_limits(1, model_dir(tmp_path), 64) == {"max_num_batched_tokens": 64, "max_num_seqs": 64}


def test_without_chunked_prefill_vllm_sizes_the_step(tmp_path):
    """An encoder-decoder is prefilled whole: a step below its context would refuse long prompts, so by default
    the token budget is left to vLLM (which sizes it to the context); a site's own number is passed on."""
    from functions.backends.step_size import chunked_prefill, step_limits

    folder = model_dir(tmp_path / "encoder-decoder", is_encoder_decoder=True)
    assert not chunked_prefill(folder)
    assert chunked_prefill(model_dir(tmp_path / "decoder"))
    _, rows = server_sizes()
    assert step_limits(1, folder, None) == {"max_num_seqs": rows}
    assert step_limits(1, folder, 4096)["max_num_batched_tokens"] == 4096


def test_the_setting_is_the_endpoints_and_a_bad_one_is_refused_by_name(tmp_path):
    from tpm_fed.sites.local import LocalSite

    assert load_policy({}).step_tokens is None  # the platform's default (step_limits)
    assert load_policy({"TPM_STEP_TOKENS": "256"}).step_tokens == 256
    for bad in ("0", "-5", "lots"):
        with pytest.raises(SiteError, match="TPM_STEP_TOKENS"):
            load_policy({"TPM_STEP_TOKENS": bad})
    short = SiteConfig.model_validate({"name": "local", "worker": {"step_tokens": 256}})
    assert "export TPM_STEP_TOKENS=256" in LocalSite.from_config(short, tmp_path).worker_init().splitlines()
    # Unset is said explicitly too, so the service's own environment does not leak into its workers.
    assert "unset TPM_STEP_TOKENS" in LocalSite.from_config(SiteConfig(name="local"), tmp_path).worker_init()
    path = tmp_path / "federation.yaml"
    path.write_text("name: f\nsites:\n  - name: local\n    worker: {step_tokens: 0}\nmodels: []\nprojects: []\n")
    with pytest.raises(FederationConfigError, match="step_tokens"):
        Federation.load(path)
