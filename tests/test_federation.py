"""The federation file is validated as a whole, with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpm_fed.protocol.errors import FederationConfigError, UnknownModel
from tpm_fed.federation import Federation

VALID = """
name: lab
sites:
  - {name: local, capacity: {max_replicas: 2}}
models:
  - {name: tiny, path: models/tiny}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text(text)
    return path


def test_valid_file_resolves_model_paths_against_its_folder(tmp_path):
    federation = Federation.load(write(tmp_path, VALID))
    assert federation.sites[0].capacity.max_replicas == 2
    assert federation.model("tiny").path == (tmp_path / "models" / "tiny").resolve()


def test_dump_and_load_round_trip(tmp_path):
    federation = Federation.load(write(tmp_path, VALID))
    federation.dump(tmp_path / "again.yaml")
    assert Federation.load(tmp_path / "again.yaml") == federation


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (VALID.replace("max_replicas: 2", "max_replicaz: 2"), "max_replicaz"),
        (VALID.replace("max_replicas: 2", "max_replicas: 0"), "max_replicas"),
        (VALID.replace("capacity:", "kind: cloud, capacity:"), "kind"),
        (VALID + "  - {name: tiny, path: other}\n", "duplicate models names: tiny"),
        ("name: lab\nsites: []\n", "sites"),
        ("sites: [unclosed\n", "not valid YAML"),
        ("- just a list\n", "mapping"),
    ],
)
def test_invalid_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(FederationConfigError, match=message):
        Federation.load(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(FederationConfigError, match="not found"):
        Federation.load(tmp_path / "nope.yaml")


def test_unknown_model_lists_known_ones(tmp_path):
    with pytest.raises(UnknownModel, match="serves: tiny"):
        Federation.load(write(tmp_path, VALID)).model("huge")
