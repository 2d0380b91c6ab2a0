"""vLLM installed while a service runs: its answers say so, with the command that restarts it.

A replica that ``auto`` put on torch because vLLM was missing stays on torch
while warm; its results used to keep saying "vllm is not installed on this
worker" after vLLM was installed. Here vLLM is missing for this process the
way Python's import system spells it (``sys.modules["vllm"] = None``), then
found (a ``vllm`` package on ``sys.path``), with no other change.
"""

from __future__ import annotations

import sys

import pytest

from functions.backends import choose_backend
from functions.replica_cache import ReplicaCache
from tpm_fed.protocol.errors import BackendUnavailable
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.versions import hash_model_dir


def demo_spec(demo_model_dir, backend: str) -> ModelSpec:
    return ModelSpec(name="demo-llama", version=hash_model_dir(demo_model_dir), path=str(demo_model_dir),
                     backend=backend)


def install_vllm(monkeypatch, tmp_path) -> None:
    """vLLM becomes findable: a ``vllm`` package on the path (found, never imported here)."""
    monkeypatch.delitem(sys.modules, "vllm")
    package = tmp_path / "site" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_warm_torch_replica_says_vllm_came_later_and_how_to_restart(demo_model_dir, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    cache = ReplicaCache(capacity=1)
    spec = demo_spec(demo_model_dir, "auto")
    cold, warm = cache.get(spec)
    assert not warm and cold.backend.name == "torch"
    assert len(cold.notes) == 1 and "vllm is not installed on this worker" in cold.notes[0]
    assert "tpm service restart" in cold.notes[0]

    again, warm = cache.get(spec)
    assert warm and again.notes == cold.notes  # nothing changed yet: the same note

    install_vllm(monkeypatch, tmp_path)
    later, warm = cache.get(spec)
    assert warm and later.backend is cold.backend  # the same torch replica, still warm
    assert later.notes[0] == cold.notes[0]
    assert later.notes[1:] == ["vllm was installed after this replica loaded on torch; it stays on torch "
                               "while warm: `tpm service restart` serves it with vLLM"]


def test_pinned_vllm_refusal_names_the_install_and_the_restart(demo_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(BackendUnavailable) as refused:
        choose_backend(demo_spec(demo_model_dir, "vllm"))
    message = str(refused.value)
    assert "vllm is not installed on this worker" in message
    assert "scripts/install-vllm.sh" in message and "tpm service restart" in message


def test_service_status_says_vllm_came_after_the_service(service, monkeypatch, tmp_path):
    """``tpm service status`` for a running service (this session's), with vLLM installed after it started."""
    import json
    import os

    from click.testing import CliRunner

    from tpm_fed.cli import main

    home = tmp_path / "home"
    home.mkdir()
    started = home / "service.json"
    started.write_text(json.dumps({"url": service.url, "token": service.token, "pid": os.getpid()}))
    os.utime(started, (1_000_000_000, 1_000_000_000))  # started long before any vllm here was written
    monkeypatch.setenv("TPM_HOME", str(home))
    monkeypatch.setitem(sys.modules, "vllm", None)

    before = CliRunner().invoke(main, ["service", "status"])
    assert before.exit_code == 0, before.output
    assert service.url in before.output and "vLLM" not in before.output  # not installed: nothing to say

    install_vllm(monkeypatch, tmp_path)
    after = CliRunner().invoke(main, ["service", "status"])
    assert after.exit_code == 0, after.output
    assert "vLLM was installed after this service started" in after.output
    assert "`tpm service restart`" in after.output

    os.utime(started)  # a service started after this vllm was installed: nothing to say
    assert "vLLM" not in CliRunner().invoke(main, ["service", "status"]).output
