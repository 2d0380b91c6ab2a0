"""A model's version id changes when its weights change, and not otherwise."""

from __future__ import annotations

import os
import shutil

import pytest

from tpm_fed.protocol.versions import VersionCache, hash_model_dir


@pytest.fixture
def model_copy(tmp_path, demo_model_dir):
    return shutil.copytree(demo_model_dir, tmp_path / "model")


def perturb_one_weight(model_dir):
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, path, metadata={"format": "pt"})


def test_same_bytes_same_version(model_copy, demo_model_dir):
    assert hash_model_dir(model_copy) == hash_model_dir(demo_model_dir)


def test_touching_or_adding_a_readme_keeps_the_version(model_copy):
    before = hash_model_dir(model_copy)
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(1, 1))
    (model_copy / "README.md").write_text("notes")
    assert hash_model_dir(model_copy) == before


def test_changed_weights_change_the_version(model_copy):
    before = hash_model_dir(model_copy)
    perturb_one_weight(model_copy)
    assert hash_model_dir(model_copy) != before


def test_changed_config_changes_the_version(model_copy):
    before = hash_model_dir(model_copy)
    config = model_copy / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps_"'))
    assert hash_model_dir(model_copy) != before


def test_cache_notices_changes(model_copy):
    cache = VersionCache()
    before = cache.version_of(model_copy)
    assert cache.version_of(model_copy) == before
    perturb_one_weight(model_copy)
    assert cache.version_of(model_copy) == hash_model_dir(model_copy) != before


def test_cache_notices_a_same_size_rewrite_with_its_old_mtime_put_back(model_copy):
    """Size and mtime alone would miss this edit: the cache keys on the ctime and inode too."""
    cache = VersionCache()
    config = model_copy / "config.json"
    before_stat = config.stat()
    before = cache.version_of(model_copy)
    text = config.read_text()
    changed = text.replace('"rms_norm_eps"', '"rms_norm_epz"')
    assert len(changed) == len(text) and changed != text
    config.write_text(changed)
    os.utime(config, ns=(before_stat.st_atime_ns, before_stat.st_mtime_ns))
    assert cache.version_of(model_copy) == hash_model_dir(model_copy) != before


def test_cache_notices_a_file_replaced_by_rename_and_a_file_added(model_copy):
    cache = VersionCache()
    before = cache.version_of(model_copy)
    config = model_copy / "config.json"
    (model_copy / "config.new").write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps_"'))
    os.replace(model_copy / "config.new", config)
    replaced = cache.version_of(model_copy)
    assert replaced == hash_model_dir(model_copy) != before
    (model_copy / "vocab.txt").write_text("a\nb\n")  # a defining file the folder did not have
    assert cache.version_of(model_copy) == hash_model_dir(model_copy) != replaced


def test_cache_keeps_the_version_when_only_a_readme_is_added(model_copy):
    cache = VersionCache()
    before = cache.version_of(model_copy)
    (model_copy / "README.md").write_text("notes")
    assert cache.version_of(model_copy) == before
