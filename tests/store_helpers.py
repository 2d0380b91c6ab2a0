"""A home for the vector-store tests: the demo model (to answer), the embedded default's encoder (the
stores' embedding model), the owner's project ``science`` and another project ``others`` with its own member."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from tpm_fed.federation import Capacity, Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.models.encoder import DEFAULT_ENCODER_NAME, default_encoder_dir
from tests.conftest import CHAT_TEMPLATE

OUTSIDER = "someone-else"
"""A member of project ``others`` only."""


def store_home(root: Path, demo_model_dir: Path, *, grant_su: float = 1000.0, others_su: float = 1000.0) -> TpmHome:
    home = TpmHome(root)
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    chat = home.models_dir / "demo-chat"  # the demo model with a chat template, for /v1/chat/completions
    shutil.copytree(demo_model_dir, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    Federation(
        name="stores",
        sites=[SiteConfig(name="local", capacity=Capacity(max_replicas=3))],  # the encoder and two answering models
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch",
                            kinds=["generate", "embed"]),
                ModelConfig(name=DEFAULT_ENCODER_NAME, path=default_encoder_dir(), kinds=["encode"]),
                ModelConfig(name="demo-chat", path=Path("models/demo-chat"), backend="torch")],
        projects=[ProjectConfig(name="science", members=[LocalUser().current()], allocations={"local": grant_su}),
                  ProjectConfig(name="others", members=[OUTSIDER], allocations={"local": others_su})],
    ).dump(home.federation_file)
    return home


def upload(client: Any, name: str, text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return client.files.create(file=(name, io.BytesIO(data)), purpose="assistants").id


def wait_until_done(client: Any, store_id: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        store = client.vector_stores.retrieve(store_id)
        if store.status != "in_progress":
            return store
        if time.monotonic() > deadline:
            raise AssertionError(f"store {store_id} still in progress: {store.file_counts}")
        time.sleep(0.2)


def unit(rows: Any) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)
