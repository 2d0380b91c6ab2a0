"""Store versions on vLLM: materialized once per node, verified, never partial (functions/model_cache.py).

The oracle is vLLM called directly on the original folder: a version added with ``tpm models add``
and served by the vLLM backend from its materialized folder must give the same greedy tokens.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from functions.model_cache import materialized_version
from tests.test_store_serving import tied_model
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.protocol.errors import ModelLoadError
from tpm_fed.storage.store_reader import StoreReader
from tpm_fed.store import ModelStore

PROMPTS = ["The telescope", "A quiet river runs", "Stars"]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _left_in(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_a_version_materializes_byte_for_byte_with_linked_small_files_and_private_folders(tmp_path, demo_model_dir):
    from safetensors.torch import load_file

    store = ModelStore(tmp_path / "store")
    version = store.import_dir(demo_model_dir, "demo")
    cache = tmp_path / "cache"
    folder = materialized_version(StoreReader(tmp_path / "store"), version, cache)
    assert folder == cache / version
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    original = load_file(demo_model_dir / "model.safetensors")
    made = load_file(folder / "model.safetensors")
    assert made.keys() == original.keys() and all((made[k] == original[k]).all() for k in original)
    assert (folder / "config.json").read_bytes() == (demo_model_dir / "config.json").read_bytes()
    assert (folder / "config.json").stat().st_nlink >= 2  # a hard link to its chunk (same file system)
    assert materialized_version(StoreReader(tmp_path / "store"), version, cache) == folder  # once per node
    assert _left_in(cache) == [version]


def test_a_corrupt_chunk_is_refused_by_its_digest_and_leaves_no_folder(tmp_path, demo_model_dir):
    store = ModelStore(tmp_path / "store")
    version = store.import_dir(demo_model_dir, "demo")
    manifest = store.manifest(version)
    biggest = max(manifest.tensors.items(), key=lambda item: item[1].nbytes)
    chunk = store.chunks.path(biggest[1].chunks[0])
    mtime = chunk.stat().st_mtime_ns
    _flip_a_byte(chunk)
    os.utime(chunk, ns=(mtime, mtime))  # decay that changes no metadata: only the digest can tell
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=f"tensor {biggest[0]}.*corrupt"):
        materialized_version(StoreReader(tmp_path / "store"), version, cache)
    assert _left_in(cache) == []


def test_a_corrupt_linked_file_is_refused_too(tmp_path, demo_model_dir):
    store = ModelStore(tmp_path / "store")
    version = store.import_dir(demo_model_dir, "demo")
    _flip_a_byte(store.chunks.path(store.manifest(version).files["config.json"]))
    with pytest.raises(ModelLoadError, match="config.json.*corrupt"):
        materialized_version(StoreReader(tmp_path / "store"), version, tmp_path / "cache")
    assert _left_in(tmp_path / "cache") == []


def test_racing_materializers_end_with_one_whole_folder(tmp_path, demo_model_dir):
    store = ModelStore(tmp_path / "store")
    version = store.import_dir(demo_model_dir, "demo")
    cache, results, errors = tmp_path / "cache", [], []

    def materialize() -> None:
        try:
            results.append(materialized_version(StoreReader(tmp_path / "store"), version, cache))
        except BaseException as error:  # noqa: BLE001 - the test reports it
            errors.append(error)

    threads = [threading.Thread(target=materialize) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and set(results) == {cache / version}
    assert _left_in(cache) == [version]  # the losers' copies are gone


pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install-vllm.sh cpu installs it)")

from tests.test_vllm_backend import direct_greedy, direct_llm  # noqa: E402, F401 - a fixture


@pytest.fixture(scope="module")
def store_vllm_home(tmp_path_factory, demo_model_dir):
    root = tmp_path_factory.mktemp("store-vllm-home")
    home = TpmHome(root)
    tied_model(demo_model_dir, root / "made" / "tied")
    Federation(
        name="store-vllm",
        sites=[SiteConfig(name="local")],
        models=[ModelConfig(name="demo", store=True, backend="vllm"),
                ModelConfig(name="broken", store=True, backend="vllm")],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()], allocations={"local": 1e6})],
    ).dump(home.federation_file)
    from tpm_fed.cli import main

    for folder, name in ((demo_model_dir, "demo"), (root / "made" / "tied", "broken")):
        added = CliRunner().invoke(main, ["models", "add", str(folder), "--name", name],
                                   env={"TPM_HOME": str(root)}, catch_exceptions=False)
        assert added.exit_code == 0, added.output
    return home


@pytest.fixture(scope="module")
def store_vllm_runtime(store_vllm_home, tmp_path_factory):
    from tpm_fed.service.runtime import Runtime

    cache = tmp_path_factory.mktemp("node-cache") / "models"
    previous = os.environ.get("TPM_MODEL_CACHE")
    os.environ["TPM_MODEL_CACHE"] = str(cache)  # the worker's policy (its environment)
    try:
        with Runtime(store_vllm_home) as runtime:
            yield runtime, cache
    finally:
        if previous is None:
            os.environ.pop("TPM_MODEL_CACHE", None)
        else:
            os.environ["TPM_MODEL_CACHE"] = previous


def test_a_model_added_with_tpm_models_add_serves_on_vllm_as_vllm_on_its_folder(store_vllm_runtime, direct_llm):  # noqa: F811
    runtime, cache = store_vllm_runtime
    result = runtime.generate(PROMPTS, model="demo", max_new_tokens=24).result(timeout=600)
    assert result.backend == "vllm" and not result.notes
    assert result.token_ids == direct_greedy(direct_llm, PROMPTS, 24)
    assert _left_in(cache) == [runtime.catalog.resolve_name("demo").spec.version]


def test_a_corrupt_store_version_is_refused_on_vllm_and_leaves_no_folder(store_vllm_runtime, store_vllm_home):
    runtime, cache = store_vllm_runtime
    store = ModelStore(store_vllm_home.root / "store")
    version = runtime.catalog.resolve_name("broken").spec.version
    manifest = store.manifest(version)
    _flip_a_byte(store.chunks.path(manifest.tensors["model.embed_tokens.weight"].chunks[0]))
    with pytest.raises(ModelLoadError, match="corrupt"):
        runtime.generate("The telescope", model="broken", max_new_tokens=4).result(timeout=600)
    assert version not in _left_in(cache) and not any(name.startswith(".") for name in _left_in(cache))
