"""What the batch tests share: a home serving the demo model and its chat twin, batch files, waiting."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tests.conftest import CHAT_TEMPLATE
from tpm_fed.federation import (
    Capacity,
    Federation,
    ModelConfig,
    ProjectConfig,
    SiteConfig,
)
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.identity import LocalUser

PROMPTS = ["The cell", "A star is", "The river carries", "Data from the telescope", "The climate model",
           "A scientist can", "The protein folds", "Water boils"]


def batch_home(root: Path, demo_model_dir: Path, *, project: str = "batches", grant_su: float = 1000.0,
               max_batch_requests: int = 64, batch_linger_ms: float | None = None,
               truncated: bool = False) -> TpmHome:
    """One local site with two replica slots (the demo model and its chat twin may both be warm),
    and the current user's ``project`` holding ``grant_su`` there. With ``truncated``, a third model
    whose weights file is cut in half (it passes every check at the edge and fails to load)."""
    home = TpmHome(root)
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    broken = []
    if truncated:
        weights = home.models_dir / "truncated" / "model.safetensors"
        shutil.copytree(demo_model_dir, weights.parent)
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        broken = [ModelConfig(name="truncated", path=Path("models/truncated"), backend="torch")]
    chat = home.models_dir / "demo-chat"
    shutil.copytree(demo_model_dir, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    site = SiteConfig(name="local", capacity=Capacity(max_replicas=2), max_batch_requests=max_batch_requests,
                      **({"batch_linger_ms": batch_linger_ms} if batch_linger_ms is not None else {}))
    Federation(
        name="batches",
        sites=[site],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch",
                            kinds=["generate", "embed", "trace"]),
                ModelConfig(name="demo-chat", path=Path("models/demo-chat"), backend="torch"), *broken],
        projects=[ProjectConfig(name=project, members=[LocalUser().current()], allocations={"local": grant_su})],
    ).dump(home.federation_file)
    return home


def mixed_lines(count: int, *, tokens: int = 4, routes: tuple[str, ...] = (
        "/v1/completions", "/v1/chat/completions", "/v1/embeddings")) -> list[dict]:
    """``count`` lines cycling through ``routes``, a few tokens each, greedy."""
    lines = []
    for index in range(count):
        prompt = f"{PROMPTS[index % len(PROMPTS)]} {index}"
        route = routes[index % len(routes)]
        if route == "/v1/completions":
            body = {"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
        elif route == "/v1/chat/completions":
            body = {"model": "demo-chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                    "temperature": 0}
        elif route == "/tpm/v1/requests":  # a trace, in its wire form
            body = {"kind": "trace", "model": {"name": DEMO_MODEL_NAME}, "prompts": [prompt],
                    "max_new_tokens": tokens, "logit_lens": {"top_k": 2}}
        else:
            body = {"model": DEMO_MODEL_NAME, "input": prompt}
        lines.append({"custom_id": f"line-{index}", "method": "POST", "url": route, "body": body})
    return lines


def jsonl(lines: list[Any]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def wait_for(client: Any, batch_id: str, done: Any = lambda b: b.status in ("completed", "cancelled", "failed"),
             timeout_s: float = 300) -> Any:
    """Poll ``client.batches.retrieve`` (the ``openai`` client) until ``done(batch)``."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} ({batch.request_counts}) after {timeout_s} s")
        time.sleep(0.1)
