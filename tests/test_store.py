"""The model store: dedup, bit-exact export, verified loads, atomic imports, clear refusals."""

from __future__ import annotations

import errno
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tpm_fed.protocol.errors import ModelLoadError, UnknownModel, UnknownVersion
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.store import ModelStore, StoreError
from tpm_fed.storage.chunks import ChunkStore


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def variant(source: Path, out: Path, change) -> Path:
    """A copy of ``source`` whose tensors ``change`` edits in place."""
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_export_reproduces_every_tensor_bit_for_bit(store, demo_model_dir, tmp_path):
    version = store.import_dir(demo_model_dir, "demo")
    out = store.export(version, tmp_path / "out")
    original, exported = load_file(demo_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype
        assert torch.equal(exported[name].view(torch.uint8), tensor.view(torch.uint8)), name
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (demo_model_dir / name).read_bytes()


def test_bfloat16_round_trips(store, demo_model_dir, tmp_path):
    halved = variant(demo_model_dir, tmp_path / "bf16", lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    out = store.export(store.import_dir(halved, "bf16"), tmp_path / "out")
    original, exported = load_file(halved / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k].view(torch.uint8), v.view(torch.uint8)) for k, v in original.items())


def test_loading_a_version_gives_the_same_model_as_the_directory(store, demo_model_dir, reference_model):
    from functions.backends.torch_backend import TorchBackend

    version = store.import_dir(demo_model_dir, "demo")
    stored = TorchBackend.load(ModelSpec(name="demo", version=version, path=str(store.root), source="store"))
    model, tokenizer = reference_model
    ids = torch.tensor([tokenizer("The climate model runs")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(stored.model(ids).logits, model(ids).logits)
    request = GenerationRequest.create("The climate model runs", "demo", max_new_tokens=20)
    direct = TorchBackend.load(ModelSpec(name="demo", version="x", path=str(demo_model_dir)))
    assert stored.generate([stored.encode(request)]) == direct.generate([direct.encode(request)])


def test_identical_content_is_one_version_and_changes_add_only_their_bytes(store, demo_model_dir, tmp_path):
    first = store.import_dir(demo_model_dir, "demo")
    assert store.import_dir(demo_model_dir, "demo") == first
    before = store.stored_bytes()
    name = "model.layers.0.mlp.down_proj.weight"
    tuned = variant(demo_model_dir, tmp_path / "tuned", lambda t: t[name].add_(0.01))
    second = store.import_dir(tuned, "demo", tag="tuned")
    added = store.stored_bytes() - before
    assert added == store.manifest(second).tensors[name].nbytes
    (change,) = store.diff(first, second)
    assert change.name == name and change.status == "changed"
    assert change.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    versions = store.versions("demo")
    assert [v.version for v in versions] == [first, second]
    assert versions[1].parent == first and versions[1].tags == ["latest", "tuned"]


def test_resolve_by_tag_prefix_and_refusals(store, demo_model_dir):
    version = store.import_dir(demo_model_dir, "demo", tag="v1")
    assert store.resolve("demo") == store.resolve("demo", "v1") == store.resolve("demo", version[:8]) == version
    with pytest.raises(UnknownVersion, match="no version or tag 'v2'"):
        store.resolve("demo", "v2")
    with pytest.raises(UnknownModel, match="has: demo"):
        store.resolve("nope")
    with pytest.raises(StoreError, match="kept by the store"):
        store.tag("demo", version, "latest")


def test_a_used_tag_is_refused_unless_moved(store, demo_model_dir, tmp_path):
    first = store.import_dir(demo_model_dir, "demo", tag="prod")
    second = store.import_dir(variant(demo_model_dir, tmp_path / "b", lambda t: t["lm_head.weight"].mul_(2)), "demo")
    with pytest.raises(StoreError, match="already on version"):
        store.tag("demo", second, "prod")
    third = variant(demo_model_dir, tmp_path / "c", lambda t: t["lm_head.weight"].mul_(3))
    with pytest.raises(StoreError, match="already on version"):
        store.import_dir(third, "demo", tag="prod")
    assert store.resolve("demo", "prod") == first
    store.tag("demo", second, "prod", move=True)
    assert store.resolve("demo", "prod") == second


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_corrupt_or_missing_chunks_are_found_by_verify_and_by_load(store, demo_model_dir, damage):
    from functions.store_loader import load_state_dict

    version = store.import_dir(demo_model_dir, "demo")
    record = store.manifest(version).tensors["model.layers.2.self_attn.q_proj.weight"]
    path = store.chunks.path(record.chunks[0])
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[100] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    word = "corrupt" if damage == "flip" else "missing"
    (problem,) = store.verify()
    assert problem.what == "tensor model.layers.2.self_attn.q_proj.weight" and word in problem.detail
    with pytest.raises(ModelLoadError, match=f"tensor model.layers.2.self_attn.q_proj.weight: chunk .* is {word}"):
        load_state_dict(store, version)


def test_a_truncated_manifest_is_refused(store, demo_model_dir):
    version = store.import_dir(demo_model_dir, "demo")
    manifest = store.root / "manifests" / f"{version}.json"
    manifest.write_bytes(manifest.read_bytes()[:-40])
    with pytest.raises(ModelLoadError):
        store.manifest(version)
    assert [p.what for p in store.verify()] == ["manifest"]


def test_disk_full_during_import_leaves_no_version_and_gc_cleans_up(store, demo_model_dir, monkeypatch):
    real_put, calls = ChunkStore.put, []

    def put_until_full(self, data):
        calls.append(1)
        if len(calls) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, data)

    monkeypatch.setattr(ChunkStore, "put", put_until_full)
    with pytest.raises(OSError, match="No space left"):
        store.import_dir(demo_model_dir, "demo")
    monkeypatch.undo()
    with pytest.raises(UnknownModel):
        store.versions("demo")
    assert list((store.root / "manifests").glob("*.json")) == []
    removed, freed = store.gc()
    assert removed == 10 and freed > 0 and list(store.chunks.all_ids()) == []
    store.import_dir(demo_model_dir, "demo")  # with space again, the import completes
    assert store.verify() == []


def test_concurrent_imports_sharing_chunks_leave_a_consistent_store(store, demo_model_dir, tmp_path):
    other = variant(demo_model_dir, tmp_path / "other", lambda t: t["model.norm.weight"].add_(1))
    results: dict[str, str] = {}

    def run(name: str, folder: Path) -> None:
        results[name] = store.import_dir(folder, name)

    threads = [threading.Thread(target=run, args=(n, f)) for n, f in (("a", demo_model_dir), ("b", other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.verify() == []
    assert store.resolve("a") == results["a"] and store.resolve("b") == results["b"]
    assert len(store.diff(results["a"], results["b"])) == 1
    assert not [p for p in store.root.rglob(".incoming-*")]


def test_bad_directories_are_refused(store, tmp_path, demo_model_dir):
    with pytest.raises(StoreError, match="not a directory"):
        store.import_dir(tmp_path / "nowhere", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no config.json"):
        store.import_dir(tmp_path / "empty", "x")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(demo_model_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(StoreError, match="only pickle weights.*never unpickled"):
        store.import_dir(pickled, "x")
    broken = tmp_path / "broken"
    shutil.copytree(demo_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(StoreError, match="runs past the end of the file"):
        store.import_dir(broken, "x")


def test_one_table_of_dtypes_agrees_with_safetensors_and_torch():
    from safetensors.torch import save

    from tpm_fed.protocol.dtypes import DTYPES, torch_dtype
    from tpm_fed.protocol.safetensors_header import parse_header

    for dtype in DTYPES:
        tensor = torch.zeros(3, dtype=torch_dtype(dtype.name))
        ([entry], _) = parse_header(save({"t": tensor}))
        assert (entry.dtype, entry.nbytes) == (dtype.code, 3 * dtype.itemsize), dtype
        assert torch_dtype(dtype.code) is tensor.dtype and tensor.dtype.itemsize == dtype.itemsize


def test_one_header_parser_for_files_and_blobs(tmp_path):
    from safetensors.torch import save

    from tpm_fed.protocol.safetensors_header import SafetensorsFormatError, parse_header, read_header
    from tpm_fed.protocol.tensors import describe_tensors

    blob = save({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.ones(4)})
    (tmp_path / "w.safetensors").write_bytes(blob)
    assert parse_header(blob) == read_header(tmp_path / "w.safetensors")
    assert describe_tensors(blob) == {"a": {"dtype": "BF16", "shape": [2, 3]}, "b": {"dtype": "F32", "shape": [4]}}
    not_an_object = (8).to_bytes(8, "little") + b"[1,2,3] "
    for broken, message in ((blob[:5], "too short"), (blob[:-4], "runs past the end"),
                            (not_an_object, "not a JSON object"), (b"\x80\x04" + bytes(40), "runs past the end")):
        with pytest.raises(SafetensorsFormatError, match=message):
            parse_header(broken)
