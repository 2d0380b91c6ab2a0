"""A worker loads models only from its endpoint's model folders, whatever path a task names.

Issue 24, suspected item: anyone who may submit to an endpoint can call the
serving function directly with a ``model`` dict of their own, so a task
could point a worker at any folder the endpoint account can read (another
project's private weights, the version hash of any folder, whether a path
exists). The endpoint's operator names the folders models live in
(``TPM_MODEL_ROOTS``, in the worker_init); a path outside them is refused,
typed, before anything is read. The local site sets it to its federation's
model folders and store.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from functions.policy import load_policy
from functions.serve import serve_batch
from tests.test_endpoint_configs import CONFIGS, load, no_hpc_interfaces, worker_policy_of  # noqa: F401 (autouse)
from tpm_fed.protocol.entrypoints import SERVE_BATCH
from tpm_fed.protocol.errors import NotPermitted, SiteError, error_from_wire
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.versions import hash_model_dir

PROMPT = "The telescope observed the"


def spec_for(folder: Path, name: str = "planted") -> dict:
    return {"name": name, "version": hash_model_dir(folder), "path": str(folder), "backend": "torch"}


def generate() -> list[dict]:
    return [GenerationRequest.create(PROMPT, "planted", max_new_tokens=2).to_wire()]


@pytest.fixture
def folders(tmp_path, demo_model_dir):
    """An endpoint's model folder holding one model, and the same model somewhere else."""
    root, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    shutil.copytree(demo_model_dir, root / "served")
    shutil.copytree(demo_model_dir, elsewhere / "private")
    (root / "link").symlink_to(elsewhere / "private")
    return root, elsewhere


@pytest.mark.parametrize("where", ["outside", "dot-dot", "symlink"])
def test_a_direct_call_naming_a_model_outside_the_endpoints_roots_is_refused_unread(folders, monkeypatch, where):
    from functions.replica_cache import REPLICAS

    root, elsewhere = folders
    monkeypatch.setenv("TPM_MODEL_ROOTS", str(root))
    path = {"outside": elsewhere / "private", "dot-dot": root / ".." / "elsewhere" / "private",
            "symlink": root / "link"}[where]
    spec = spec_for(elsewhere / "private") | {"path": str(path)}
    reply = serve_batch(spec, generate())
    error = error_from_wire(reply["outcomes"][0]["error"]) if "error" in reply["outcomes"][0] else None
    assert isinstance(error, NotPermitted) and "TPM_MODEL_ROOTS" in str(error)
    assert reply["replica"] is None and all(s.path != str(path) for s in REPLICAS.loaded())


def test_a_model_inside_the_roots_is_served(folders, monkeypatch):
    root, elsewhere = folders
    monkeypatch.setenv("TPM_MODEL_ROOTS", os.pathsep.join([str(elsewhere / "nothing-here"), str(root)]))
    reply = serve_batch(spec_for(root / "served"), generate())
    assert "result" in reply["outcomes"][0], reply["outcomes"]


def test_model_roots_must_be_absolute_folders():
    with pytest.raises(SiteError, match="TPM_MODEL_ROOTS"):
        load_policy({"TPM_MODEL_ROOTS": "models"})
    assert load_policy({"TPM_MODEL_ROOTS": "/a:/b"}).model_roots == [Path("/a"), Path("/b")]


def test_the_local_site_confines_its_workers_to_the_federations_models(runtime, tmp_path, demo_model_dir):
    site = runtime.site("local")
    [roots] = [line for line in site.worker_init().splitlines() if "TPM_MODEL_ROOTS" in line]
    assert roots.startswith("export") and str(runtime.home.models_dir.resolve()) in roots
    planted = tmp_path / "planted"  # readable by the endpoint's account, but no model of the federation
    shutil.copytree(demo_model_dir, planted)
    reply = site.submit(SERVE_BATCH, spec_for(planted), generate(), {}).result(timeout=300)
    error = error_from_wire(reply["outcomes"][0]["error"]) if "error" in reply["outcomes"][0] else None
    assert isinstance(error, NotPermitted) and "TPM_MODEL_ROOTS" in str(error)
    assert str(planted) not in str(error)  # the caller learns nothing about the folder


def test_every_endpoint_config_names_its_model_folders():
    def policy(config: str, **replace: str):
        return worker_policy_of(load((CONFIGS / config).read_text()).engine.executor.provider.worker_init, **replace)

    assert [str(p) for p in policy("slurm-gpu-vllm.yaml").model_roots] == [
        "/global/cfs/cdirs/m0000/tpm-fed/models", "/global/cfs/cdirs/m0000/tpm-fed/store"]
    assert [str(p) for p in policy("byo-lab.yaml").model_roots] == ["/srv/tpm-fed/models", "/srv/tpm-fed/store"]
    assert policy("workstation.yaml").model_roots  # the owner's own folder ($HOME/tpm-fed/models)
    shared = policy("pbs-gpu.yaml", **{"/eagle/MyProject/tpm-fed/worker-policy.yaml":
                                       str(CONFIGS / "worker-policy" / "rcc-shared.yaml")})
    assert [str(p) for p in shared.model_roots] == ["/eagle/MyProject/tpm-fed/models", "/eagle/MyProject/tpm-fed/store"]
