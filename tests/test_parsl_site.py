"""A ``parsl`` site: an endpoint config's engine run by the broker's process, no cloud hop."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.service_helpers import tpm_in_process
from tpm_fed.service.runtime import Runtime
from tpm_fed.protocol.errors import FederationConfigError
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.sites import build_site
from tpm_fed.sites.parsl_engine import ParslEngineSite

CONFIGS = Path(__file__).parent.parent / "endpoint_configs"


def workstation_config(folder: Path, models: Path) -> Path:
    """endpoint_configs/workstation.yaml, its worker_init pointed at this environment and at ``models``."""
    text = (CONFIGS / "workstation.yaml").read_text()
    text = text.replace("source ~/tpm-fed/.venv/bin/activate", f"source {Path(sys.prefix) / 'bin' / 'activate'}")
    text = text.replace("TPM_MODEL_ROOTS=$HOME/tpm-fed/models", f"TPM_MODEL_ROOTS={models}")
    assert str(sys.prefix) in text and str(models) in text
    path = folder / "workstation.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_workstation_config_serves_the_same_tokens_as_the_local_site(tmp_path, demo_model_dir):
    home = TpmHome(tmp_path / "home")
    home.models_dir.mkdir(parents=True)
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    Federation(
        name="parsl-tests",
        sites=[SiteConfig(name="local"),
               SiteConfig(name="cluster", access="parsl", engine_config=workstation_config(tmp_path, home.models_dir))],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch")],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()],
                                allocations={"local": 1e6, "cluster": 1e6})],
    ).dump(home.federation_file)

    prompts = ["The telescope", "A star"]
    with Runtime(home) as runtime:
        on_cluster = runtime.generate(prompts, max_new_tokens=6, project="tests", site="cluster").result(120)
        on_local = runtime.generate(prompts, max_new_tokens=6, project="tests", site="local").result(120)
        status = {s.name: s for s in runtime.status()}
    assert on_cluster.site == "cluster" and on_cluster.token_ids == on_local.token_ids
    assert status["cluster"].access == "parsl" and status["cluster"].state == "running"
    assert on_cluster.replica.pid != on_local.replica.pid  # its own worker, started by its own engine


def test_slurm_config_builds_its_provider_and_launcher_without_starting(tmp_path, monkeypatch):
    import parsl.addresses

    monkeypatch.setattr(parsl.addresses, "address_by_interface", lambda ifname: "10.0.0.1")
    site = build_site(SiteConfig(name="perlmutter", access="parsl",
                                 engine_config=CONFIGS / "slurm-gpu-vllm.yaml"), tmp_path)
    try:
        assert isinstance(site, ParslEngineSite)
        provider = site.engine.executor.provider
        assert type(provider).__name__ == "SlurmProvider" and provider.account == "m0000"
        assert type(provider.launcher).__name__ == "SrunLauncher"
        assert site.workers == 1 and site.status().state == "stopped"
    finally:
        site.shutdown()


def test_a_broken_engine_config_is_refused_with_the_loaders_message(tmp_path, monkeypatch, demo_model_dir):
    broken = tmp_path / "broken.yaml"
    broken.write_text((CONFIGS / "workstation.yaml").read_text().replace("LocalProvider", "LocalProvidr"))
    with pytest.raises(FederationConfigError, match="LocalProvidr"):
        build_site(SiteConfig(name="typo", access="parsl", engine_config=broken), tmp_path)

    home = TpmHome(tmp_path / "home")
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)  # the embedded default, without training
    home.ensure_embedded_default(progress=False)
    result = tpm_in_process(home.root, monkeypatch, "sites", "add", "typo", "--engine-config", str(broken))
    assert result.exit_code == 1 and "LocalProvidr" in result.output
    assert "typo" not in {s.name for s in Federation.load(home.federation_file).sites}


def test_site_fields_must_match_the_access():
    with pytest.raises(ValueError, match="needs engine_config"):
        SiteConfig(name="x", access="parsl")
    with pytest.raises(ValueError, match="needs endpoint_id"):
        SiteConfig(name="x", access="globus-compute")
    with pytest.raises(ValueError, match="engine_config is for other kinds of access"):
        SiteConfig(name="x", endpoint_id=None, engine_config=Path("a.yaml"))
