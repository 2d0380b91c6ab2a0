"""The ``tpm`` command, run as a user runs it: a console script in a subprocess."""

from __future__ import annotations

import importlib.util

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tpm_fed.federation import Federation
from tpm_fed.models.encoder import DEFAULT_ENCODER_NAME, default_encoder_dir
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.identity import LocalUser

TPM = str(Path(sys.executable).parent / "tpm")


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory, demo_model_dir) -> TpmHome:
    """An embedded default home, with the demo model copied in rather than retrained."""
    home = TpmHome(tmp_path_factory.mktemp("cli-home"))
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    home.ensure_embedded_default(progress=False)
    yield home
    tpm(home, "service", "stop")  # the first submit started the home's service


def tpm(home: TpmHome, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # TPM_MODEL_CACHE: store versions materialized for vLLM stay in the test's home, not the user's cache.
    env = {**os.environ, "TPM_HOME": str(home.root), "TPM_MODEL_CACHE": str(home.root / "model-cache")}
    return subprocess.run([TPM, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_embedded_default_is_one_local_site_and_the_demo_model(cli_home):
    federation = Federation.load(cli_home.federation_file)
    assert [(s.name, s.billing, s.access) for s in federation.sites] == [("local", "rcc", "local")]
    # The demo LLM, and the encoder a vector store embeds with (installed with tpm-fed, read in place).
    assert [m.name for m in federation.models] == [DEMO_MODEL_NAME, DEFAULT_ENCODER_NAME]
    (project,) = federation.projects
    assert project.members == [LocalUser().current()] and project.allocations == {"local": 1000.0}
    assert federation.models[0].path == (cli_home.models_dir / DEMO_MODEL_NAME).resolve()
    assert federation.models[1].kinds == ["encode"] and federation.models[1].path == default_encoder_dir()


def test_submit_prints_text_then_usage_and_version(cli_home):
    done = tpm(cli_home, "submit", "The cell divides", "--max-tokens", "12")
    assert done.returncode == 0, done.stderr
    text, usage = done.stdout.rstrip("\n").split("\n")
    assert text.strip()
    assert "completion tokens" in usage and f"{DEMO_MODEL_NAME}@" in usage
    assert re.search(r"\| (torch|vllm) on local \|", usage)  # the embedded default is backend: auto
    assert "starting the service" in done.stderr  # progress goes to stderr, not into the answer


def test_a_warm_submit_streams_without_importing_the_full_client(cli_home):
    """A warm streamed submit imports neither httpx nor pydantic (the full client's half second of
    imports), and its greedy text is the full client's for the same prompt."""
    tpm(cli_home, "submit", "The cell", "--max-tokens", "2")  # the home's service and its replica are warm
    code = ("import sys\nfrom tpm_fed.cli import main\n"
            "main(['submit', 'The river carries', '--max-tokens', '12'], standalone_mode=False)\n"
            "print(sorted(m for m in ('httpx', 'pydantic', 'tpm_fed.client', 'tpm_fed.federation') if m in sys.modules))")
    env = {**os.environ, "TPM_HOME": str(cli_home.root), "TPM_MODEL_CACHE": str(cli_home.root / "model-cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    *text, usage, loaded = done.stdout.rstrip("\n").split("\n")
    assert loaded == "[]"
    full = json.loads(tpm(cli_home, "submit", "The river carries", "--max-tokens", "12", "--json").stdout)
    assert "\n".join(text) == full["completions"][0]["text"] and full["completions"][0]["text"].strip()
    assert f"| {DEMO_MODEL_NAME}@{full['version']} | {full['backend']} on local | replica warm |" in usage
    assert f"{full['usage']['prompt_tokens']} prompt + {full['usage']['completion_tokens']} completion" in usage


def test_a_service_that_does_not_answer_is_one_readable_line(tmp_path):
    """The warm path's first call is the health check: a service named but not answering falls back to
    the full client, whose refusal is one line (and nothing was sent)."""
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    env = {**os.environ, "TPM_HOME": str(tmp_path / "no-home"), "TPM_URL": f"http://127.0.0.1:{port}",
           "TPM_TOKEN": "x"}
    done = subprocess.run([TPM, "submit", "x"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "SiteError: the service at" in done.stderr and "could not be reached" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "no-home").exists()

def test_submit_file_as_json(cli_home, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cell\n\nThe river carries\n")
    done = tpm(cli_home, "submit", "--file", str(prompts), "--max-tokens", "6", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["completions"]) == 2
    assert result["model"] == DEMO_MODEL_NAME and len(result["version"]) == 16
    assert result["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in result["completions"])

    status = tpm(cli_home, "status")
    assert status.returncode == 0
    # The submit's process is gone; the home's service keeps its replica warm for the next call.
    replica = f"local/{DEMO_MODEL_NAME}@{result['version']}/auto/0"
    assert [line.split()[:2] for line in status.stdout.splitlines() if replica in line] == [["warm", replica]]
    models = tpm(cli_home, "models")
    header, *rows = models.stdout.splitlines()
    assert header.split()[:3] == ["model", "version", "context"]
    assert [row.split()[:3] for row in rows if row.startswith(DEMO_MODEL_NAME)] == [[DEMO_MODEL_NAME, result["version"], "256"]]
    assert [row.split()[0] for row in rows] == [DEMO_MODEL_NAME, DEFAULT_ENCODER_NAME]
    slo = tpm(cli_home, "slo")  # the service counted the submit above; the embedded default sets no target
    assert slo.returncode == 0, slo.stderr
    (generate,) = [line.split() for line in slo.stdout.splitlines() if line.startswith("generate")]
    assert int(generate[1]) >= 1 and generate[-2:] == ["no", "target"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "x", "--model", "nope"], "UnknownModel: unknown model 'nope'; the federation serves: demo-llama"),
        (["submit", "x", "--model", "demo-llama@0000"], "UnknownVersion"),
        # Checked by the service, which names the body's field, as the option is spelled (the full client's
        # own check, with --json, names the request's field: max_new_tokens).
        (["submit", "x", "--max-tokens", "0"], "InvalidRequest: max_tokens"),
        (["submit", "x", "--max-tokens", "0", "--json"], "InvalidRequest: max_new_tokens"),
        (["submit", "x", "--max-tokens", "999"], "ContextLengthExceeded"),
        (["submit", "x", "--temperature", "-1"], "InvalidRequest: temperature"),
        (["submit", " "], "prompt 0 is empty"),
        (["submit"], "give a PROMPT or --file"),
    ],
)
def test_bad_input_exits_nonzero_with_one_readable_line(cli_home, args, message):
    done = tpm(cli_home, *args, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert "starting site" not in done.stderr  # refused before any site started


def test_importing_tpm_fed_does_not_import_torch_or_vllm():
    code = ("import sys, tpm_fed, tpm_fed.cli\n"
            "commands = [tpm_fed.cli.main.get_command(None, n) for n in tpm_fed.cli.main.list_commands(None)]\n"
            "assert all(commands), commands\n"
            "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_submit_quote_prints_the_bound_and_runs_nothing(cli_home):
    before = tpm(cli_home, "usage", "--project", "local").stdout
    quoted = tpm(cli_home, "submit", "The cell divides", "--max-tokens", "12", "--quote", "--json")
    assert quoted.returncode == 0, quoted.stderr
    quote = json.loads(quoted.stdout)
    assert quote["site"] == "local" and quote["project"] == "local" and 0 < quote["expected_su"] <= quote["max_su"]
    said = tpm(cli_home, "submit", "The cell divides", "--max-tokens", "12", "--quote")
    assert said.returncode == 0 and said.stdout.startswith("quote: ") and "Nothing was run or charged" in said.stdout
    assert tpm(cli_home, "usage", "--project", "local").stdout == before

    ran = tpm(cli_home, "submit", "The cell divides", "--max-tokens", "12", "--json")
    assert 0 < json.loads(ran.stdout)["charge"]["charged_su"] <= quote["max_su"]
    refused = tpm(cli_home, "submit", "x", "--quote", "--model", "no-such-model")
    assert refused.returncode == 1 and "UnknownModel" in refused.stderr


def test_accounting_and_own_compute(cli_home, tmp_path):
    me = LocalUser().current()
    assert tpm(cli_home, "sites", "add", "mylab", "--byo", "--project", "local").returncode == 0
    assert tpm(cli_home, "projects", "add", "astro", "--member", "ana").returncode == 0
    assert tpm(cli_home, "projects", "grant", "astro", "local", "5").returncode == 0

    refused = tpm(cli_home, "submit", "x", "--project", "astro")
    assert refused.returncode == 1 and f"NotPermitted: '{me}' is not a member of project 'astro'" in refused.stderr

    own = tpm(cli_home, "submit", "The cell", "--site", "mylab", "--max-tokens", "4", "--explain")
    assert own.returncode == 0, own.stderr
    assert "free on local's own site" in own.stdout
    assert "placed on mylab" in own.stderr and "free (own site)" in own.stderr

    statement = tpm(cli_home, "usage", "--project", "local")
    assert statement.returncode == 0
    lines = [line for line in statement.stdout.splitlines() if " settled " in line]
    assert any(" mylab " in line and line.rstrip().endswith("free") for line in lines)
    assert any(" local " in line and not line.rstrip().endswith("free") for line in lines)

    balances = tpm(cli_home, "allocations").stdout
    assert "astro" in balances and "5.000000" in balances
    local_row = next(line for line in balances.splitlines() if line.startswith("local "))
    assert float(local_row.split()[3].replace(",", "")) > 0  # spent by the earlier submits

    # The same service, as a remote one: TPM_URL/TPM_TOKEN, no home of its own.
    service = json.loads((cli_home.root / "service.json").read_text())
    remote = subprocess.run([TPM, "allocations"], capture_output=True, text=True, timeout=60, env={
        **os.environ, "TPM_HOME": str(tmp_path / "no-home"), "TPM_URL": service["url"], "TPM_TOKEN": service["token"]})
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == balances and not (tmp_path / "no-home").exists()

    listed = tpm(cli_home, "projects", "list").stdout
    assert re.search(r"^astro +ana +local=5$", listed, re.MULTILINE)
    assert tpm(cli_home, "projects", "remove-member", "astro", "ana").returncode == 0
    assert re.search(r"^astro +none +local=5$", tpm(cli_home, "projects", "list").stdout, re.MULTILINE)
    assert tpm(cli_home, "sites", "remove", "mylab").returncode == 0
    assert [line.split()[0] for line in tpm(cli_home, "sites", "list").stdout.splitlines()[1:]] == ["local"]
    # The service took every change while running: the same process, its replica still warm.
    assert json.loads((cli_home.root / "service.json").read_text())["pid"] == service["pid"]
    warm = tpm(cli_home, "submit", "The cell", "--max-tokens", "2")
    assert warm.returncode == 0 and "| replica warm |" in warm.stdout, warm.stdout

    bad = tpm(cli_home, "sites", "add", "x", "--byo")
    assert bad.returncode == 2 and "--byo needs --project" in bad.stderr
    bad = tpm(cli_home, "projects", "grant", "astro", "moon", "5")
    assert bad.returncode == 1 and "unknown site 'moon'" in bad.stderr
    assert tpm(cli_home, "usage", "--since", "yesterday").returncode == 2


def test_model_store_commands_and_serving_a_pinned_version(cli_home, demo_model_dir, tmp_path):
    added = tpm(cli_home, "models", "add", str(demo_model_dir), "--name", "kept", "--tag", "v1")
    assert added.returncode == 0, added.stderr
    version = added.stdout.strip().split("@")[1]
    assert len(version) == 64

    tuned = tmp_path / "tuned"
    shutil.copytree(demo_model_dir, tuned)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tuned / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 1.5
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    second = tpm(cli_home, "models", "add", str(tuned), "--name", "kept").stdout.strip().split("@")[1]

    header, *listing = tpm(cli_home, "models", "versions", "kept").stdout.splitlines()
    assert header.split()[0] == "version" and [line.split()[0] for line in listing] == [version, second]
    assert listing[0].endswith("v1") and listing[1].endswith("latest")
    diff = tpm(cli_home, "models", "diff", "kept@v1", "kept@latest").stdout
    assert re.search(r"^changed +lm_head\.weight ", diff, re.MULTILINE) and "1 tensors differ" in diff
    assert "already on version" in tpm(cli_home, "models", "tag", f"kept@{second[:10]}", "v1").stderr
    assert tpm(cli_home, "models", "verify", "kept").returncode == 0

    served = tpm(cli_home, "submit", "The cell", "--model", "kept@v1", "--max-tokens", "6", "--json")
    assert served.returncode == 0, served.stderr
    result = json.loads(served.stdout)
    # backend auto: a store version is served by vLLM where it is installed (materialized for it), else torch
    expected = "vllm" if importlib.util.find_spec("vllm") else "torch"
    assert result["model"] == "kept" and result["version"] == version and result["backend"] == expected

    out = tmp_path / "exported"
    assert tpm(cli_home, "models", "export", "kept@v1", str(out)).returncode == 0
    assert (out / "config.json").read_bytes() == (demo_model_dir / "config.json").read_bytes()

    refused = tpm(cli_home, "models", "add", str(tmp_path / "nowhere"), "--name", "x")
    assert refused.returncode == 1 and "StoreError" in refused.stderr and "Traceback" not in refused.stderr
    unknown = tpm(cli_home, "submit", "x", "--model", "kept@nope")
    assert unknown.returncode == 1 and "UnknownVersion: model 'kept' has no version or tag 'nope'" in unknown.stderr
    assert "removed 0 chunks" in tpm(cli_home, "models", "gc").stdout


def test_inspect_lists_points_with_shapes_and_heads(cli_home):
    done = tpm(cli_home, "models", "inspect", "demo-llama", "--grep", "layers.2.self_attn")
    assert done.returncode == 0, done.stderr
    assert "model.layers.2.self_attn.heads[0..3]" in done.stdout and "[32]" in done.stdout
    assert "model.layers.2.self_attn.o_proj.input" in done.stdout


def test_trace_saves_points_and_prints_the_logit_lens(cli_home, tmp_path):
    out = tmp_path / "tensors.safetensors"
    done = tpm(cli_home, "trace", "The telescope observed", "--save", "model.layers.2", "--logit-lens",
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "0:model.layers.2.output: float32 [11, 128]" in done.stdout
    assert "layer 3:" in done.stdout
    from safetensors.numpy import load_file

    assert load_file(out)["0:model.layers.2.output"].shape == (11, 128)


def test_trace_runs_a_session_file(cli_home, tmp_path):
    session = tmp_path / "session.json"
    session.write_text(json.dumps({"steps": [
        {"name": "read", "prompts": ["the bright sky", "the dark sky"],
         "steps": [{"op": "save", "point": "model.layers.1", "name": "h", "reduce": {"op": "mean"}}]},
        {"name": "steer", "prompts": ["The telescope observed the"], "max_new_tokens": 4,
         "steps": [{"op": "add", "point": "model.layers.1", "generated": True, "value_from": {"terms": [
             {"step": "read", "save": "h", "prompt": 0, "weight": 4},
             {"step": "read", "save": "h", "prompt": 1, "weight": -4}]}}]},
    ]}))
    out = tmp_path / "session.safetensors"
    done = tpm(cli_home, "trace", "--session", str(session), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "2 steps" in done.stdout and "step steer: " in done.stdout and "4 generated" in done.stdout
    assert "0:h: float32 [128]" in done.stdout
    from safetensors.numpy import load_file

    assert set(load_file(out)) == {"read/0:h", "read/1:h"}

    session.write_text(json.dumps({"steps": [{"name": "a", "prompts": ["x"], "steps": [
        {"op": "add", "point": "model.layers.1", "value_from": {"terms": [{"step": "b", "save": "h"}]}}]}]}))
    refused = tpm(cli_home, "trace", "--session", str(session))
    assert refused.returncode == 1 and "not an earlier step" in refused.stderr and "Traceback" not in refused.stderr
    both = tpm(cli_home, "trace", "x", "--session", str(session))
    assert both.returncode == 2 and "give no PROMPTS" in both.stderr


def test_trace_with_an_unknown_point_names_the_closest_and_exits_1(cli_home):
    done = tpm(cli_home, "trace", "x", "--save", "model.layers.7")
    assert done.returncode == 1
    assert "UnknownPoint" in done.stderr and "closest: model.layers.3.output" in done.stderr


def test_adapters_add_refuses_pickles_and_lists_what_it_registered(cli_home, tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    architecture = tmp_path / "arch.json"
    architecture.write_text(json.dumps({"layers": [{"type": "linear", "in_features": 6, "out_features": 128}]}))
    layer = torch.nn.Sequential(torch.nn.Linear(6, 128))
    torch.save(layer.state_dict(), tmp_path / "weights.pt")
    refused = tpm(cli_home, "adapters", "add", "spectrum-in", "--architecture", str(architecture),
                  "--weights", str(tmp_path / "weights.pt"))
    assert refused.returncode == 1 and "not a safetensors file" in refused.stderr
    save_file(layer.state_dict(), tmp_path / "weights.safetensors")
    added = tpm(cli_home, "adapters", "add", "spectrum-in", "--architecture", str(architecture),
                "--weights", str(tmp_path / "weights.safetensors"))
    assert added.returncode == 0, added.stderr
    listed = tpm(cli_home, "adapters", "list")
    assert added.stdout.split()[0] in listed.stdout


def test_tables_keep_each_row_on_one_line_when_piped(capsys):
    from tpm_fed.cli.tables import print_table

    long = "x" * 300
    print_table(["name", "shape", "n"], [(long, "[bold]", 7), ("b", None, 12)], right={"n"})
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "shape", "n"]
    assert first.split() == [long, "[bold]", "7"]  # not cut to 80 columns; brackets are text, not markup
    assert second.split() == ["b", "12"] and second.endswith(" 12") and first.endswith("  7")
    assert not any(line.endswith(" ") for line in (header, first, second))
    print_table(["name"], [])
    assert capsys.readouterr().out == ""
