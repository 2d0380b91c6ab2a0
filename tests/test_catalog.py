"""The catalog pins a model folder to its version on every request, and sees a change made in place at once."""

from __future__ import annotations

import json
import os
import shutil

from tpm_fed.catalog import ModelCatalog
from tpm_fed.federation import Federation, ModelConfig, SiteConfig
from tpm_fed.protocol.requests import ModelRef
from tpm_fed.protocol.versions import hash_model_dir


def test_a_config_changed_in_place_is_served_under_its_new_version_and_context(tmp_path, demo_model_dir):
    folder = shutil.copytree(demo_model_dir, tmp_path / "model")
    federation = Federation(name="t", sites=[SiteConfig(name="local")],
                            models=[ModelConfig(name="m", path=folder, backend="torch")])
    catalog = ModelCatalog(federation)
    first = catalog.resolve(ModelRef.parse("m"))
    assert catalog.resolve(ModelRef.parse("m")) == first

    config_file = folder / "config.json"
    stat = config_file.stat()
    config = json.loads(config_file.read_text())
    config["max_position_embeddings"] = first.context_length // 2
    config_file.write_text(json.dumps(config))
    os.utime(config_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old mtime back: only ctime tells

    second = catalog.resolve(ModelRef.parse("m"))
    assert second.spec.version == hash_model_dir(folder) != first.spec.version
    assert second.context_length == first.context_length // 2
    assert catalog.resolve(ModelRef.parse(f"m@{second.spec.version[:8]}")) == second
