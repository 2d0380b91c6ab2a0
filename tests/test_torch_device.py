"""Where the torch backend runs: the endpoint's ``TPM_TORCH_DEVICE``, never a task's say.

On this machine (no GPU) the oracles of ``scripts/check_torch_device.py`` run
on the CPU; on a GPU machine the same script runs them on the GPU (figures in
docs/performance.md). A GPU the operator names that torch cannot see refuses
the load, typed, rather than quietly serving on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from functions.policy import load_policy
from functions.serve import serve_batch
from tpm_fed.protocol.errors import ModelLoadError, SiteError, error_from_wire
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.versions import hash_model_dir

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))


def test_the_device_checks_hold_on_the_cpu(demo_model_dir, monkeypatch):
    import check_torch_device

    monkeypatch.setenv("TPM_TORCH_DEVICE", "cpu")  # run_checks sets it too; monkeypatch restores it
    checks = check_torch_device.run_checks(Path(demo_model_dir), "cpu")
    assert len(checks) == 7
    assert [name for name, held, detail in checks if not held] == [], checks


def _served_on(device: str, model_dir: Path, name: str, monkeypatch) -> dict:
    monkeypatch.setenv("TPM_TORCH_DEVICE", device)
    spec = {"name": name, "version": hash_model_dir(model_dir), "path": str(model_dir), "backend": "torch"}
    return serve_batch(spec, [GenerationRequest.create("The cell divides", name, max_new_tokens=2).to_wire()], {})


def test_a_gpu_torch_cannot_see_refuses_the_load_naming_the_variable(demo_model_dir, monkeypatch):
    reply = _served_on("cuda:99", Path(demo_model_dir), "on-gpu-99", monkeypatch)
    error = error_from_wire(reply["outcomes"][0]["error"])
    assert isinstance(error, ModelLoadError)
    assert "TPM_TORCH_DEVICE=cuda:99" in str(error) and "GPU" in str(error)


def test_a_malformed_device_refuses_every_request_naming_the_variable(demo_model_dir, monkeypatch):
    reply = _served_on("gpu", Path(demo_model_dir), "on-gpu", monkeypatch)
    error = error_from_wire(reply["outcomes"][0]["error"])
    assert isinstance(error, SiteError) and "TPM_TORCH_DEVICE" in str(error)
    assert reply["replica"] is None


@pytest.mark.parametrize("setting", ["auto", "cpu", "cuda", "cuda:1"])
def test_the_policy_takes_the_device_settings(setting):
    assert load_policy({"TPM_TORCH_DEVICE": setting}).torch_device == setting
    assert load_policy({}).torch_device == "auto"
