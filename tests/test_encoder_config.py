"""The encoder's pooling and normalization come from its own folder, as sentence-transformers reads it.

Each case rewrites a copy of the default encoder's folder (the weights linked,
not copied) and compares the encoder backend with ``SentenceTransformer`` on
that same folder: a backend that ignored the folder's config would pass the
default model and fail here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from functions.backends.encoder_backend import EncoderBackend
from tpm_fed.models.encoder import default_encoder_dir
from tpm_fed.protocol.encoder_config import read_encoder_config
from tpm_fed.protocol.errors import ModelLoadError
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.versions import hash_model_dir

TEXTS = ["A cell divides.", "Rivers carry silt to the sea, and deltas grow where it settles.", "Zürich"]


def _copy(tmp_path: Path) -> Path:
    source = default_encoder_dir()
    folder = tmp_path / "encoder"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(source / "model.safetensors", folder / "model.safetensors")
    return folder


def _modules(folder: Path, normalize: bool) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    if not normalize:
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
    (folder / "modules.json").write_text(json.dumps(modules))


def _pooling(folder: Path, **flags: bool) -> None:
    config = {"word_embedding_dimension": 384, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False, **flags}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))


def _served(folder: Path):
    spec = ModelSpec(name="copy", version=hash_model_dir(folder), path=str(folder), backend="encoder")
    return EncoderBackend.load(spec).encode_texts(TEXTS)


@pytest.mark.parametrize(("flags", "normalize"), [
    ({"pooling_mode_cls_token": True}, False),
    ({"pooling_mode_max_tokens": True}, True),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, True),
])
def test_the_folders_pooling_and_normalization_are_served_as_sentence_transformers_reads_them(tmp_path, flags,
                                                                                             normalize):
    from sentence_transformers import SentenceTransformer

    folder = _copy(tmp_path)
    _pooling(folder, **flags)
    _modules(folder, normalize)
    expected = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    served = _served(folder)
    assert served.shape == expected.shape == (len(TEXTS), 384 * len(flags))
    assert np.abs(served - expected).max() <= 1e-5
    norms = np.linalg.norm(served, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == normalize


def test_the_pooling_config_is_part_of_the_version(tmp_path):
    folder = _copy(tmp_path)
    before = hash_model_dir(folder)
    assert before == hash_model_dir(default_encoder_dir())
    _pooling(folder, pooling_mode_cls_token=True)
    assert hash_model_dir(folder) != before


def test_a_module_that_is_not_served_is_refused_by_name(tmp_path):
    folder = _copy(tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense"):
        read_encoder_config(folder, "copy")


def test_the_context_is_the_folders_max_seq_length(tmp_path):
    folder = _copy(tmp_path)
    assert read_encoder_config(folder).max_tokens == 256
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    assert read_encoder_config(folder).max_tokens == 128
