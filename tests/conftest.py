"""Shared fixtures: one demo model and one running local site per test session.

Making the demo model (~15 s) and starting the endpoint engine (~5 s) are the
slow parts, so the session does each once. The federation used by the tests
holds the demo model plus deliberately broken models, so refusals are tested
on the same engine and replica that serve the good requests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tpm_fed.client import Client
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.identity import LocalUser
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    from tpm_fed.models.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("models") / DEMO_MODEL_NAME, progress=False)


@pytest.fixture(scope="session")
def home(tmp_path_factory, demo_model_dir: Path) -> TpmHome:
    """A tpm home whose federation serves the demo model and some broken ones."""
    home = TpmHome(tmp_path_factory.mktemp("tpm-home"))
    models = home.models_dir
    models.mkdir(parents=True)
    shutil.copytree(demo_model_dir, models / DEMO_MODEL_NAME)

    truncated = models / "truncated"
    shutil.copytree(demo_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    no_weights = models / "no-weights"
    shutil.copytree(demo_model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()

    shutil.copytree(demo_model_dir, models / "mutable")

    Federation(
        name="tests",
        sites=[SiteConfig(name="local")],
        models=[
            # Pinned to torch: these tests check the torch backend against
            # transformers; the vLLM backend has its own tests and site.
            ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch",
                        kinds=["generate", "embed", "trace"]),
            ModelConfig(name="truncated", path=Path("models/truncated"), backend="torch"),
            ModelConfig(name="no-weights", path=Path("models/no-weights"), backend="torch"),
            ModelConfig(name="mutable", path=Path("models/mutable"), backend="torch"),
            ModelConfig(name="missing", path=Path("models/not-there"), backend="torch"),
        ],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()], allocations={"local": 1e6})],
    ).dump(home.federation_file)
    return home


@pytest.fixture(scope="session")
def client(home: TpmHome):
    with Client(home, create_default=False) as client:
        yield client


@pytest.fixture(scope="session")
def reference_model(demo_model_dir: Path):
    """The demo model loaded directly with transformers: the oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir, padding_side="left")
    return model, tokenizer
