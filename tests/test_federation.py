"""The federation file is validated as a whole, with the field named."""

from __future__ import annotations

import os
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


def test_dump_replaces_the_file_whole_and_keeps_its_permissions(tmp_path):
    federation = Federation.load(write(tmp_path, VALID))
    path = tmp_path / "federation.yaml"
    path.chmod(0o640)
    federation.dump(path)
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["federation.yaml"]  # no staging file left
    umask = os.umask(0o022)
    os.umask(umask)
    federation.dump(tmp_path / "new.yaml")  # a new file: the usual mode, not the staging file's 0o600
    assert (tmp_path / "new.yaml").stat().st_mode & 0o777 == 0o666 & ~umask


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


def test_unknown_names_list_the_known_ones(tmp_path):
    federation = Federation.load(write(tmp_path, VALID))
    with pytest.raises(UnknownModel, match="^unknown model 'huge'; the federation serves: tiny$"):
        federation.model("huge")
    with pytest.raises(FederationConfigError, match="^unknown site 'moon'; the federation has: local$"):
        federation.site("moon")
    with pytest.raises(FederationConfigError, match="^unknown project 'astro'; the federation has: none$"):
        federation.project("astro")
    assert federation.site("local").name == "local"


def test_the_joining_window_keeps_its_old_name_in_files_and_defaults_to_a_quarter_of_the_task_timeout(tmp_path):
    """``join_for_s`` was ``admit_for_s`` (one word, one meaning: *admit* is the broker's): old files still load."""
    old = Federation.load(write(tmp_path, VALID.replace("{name: local,", "{name: local, admit_for_s: 12,")))
    assert old.sites[0].join_for_s == 12.0
    site = Federation.load(write(tmp_path, VALID)).sites[0]
    assert site.join_for_s == site.task_timeout_s / 4
    again = tmp_path / "again.yaml"
    old.dump(again)
    assert "join_for_s: 12" in again.read_text() and "admit_for_s" not in again.read_text()
