"""A federation file written before request kinds were renamed says what to write now.

``modes: [query, embedding, intermediary]`` became ``kinds: [generate, embed,
trace]`` and the price rows were renamed the same way. Such a file used to
fail with pydantic's "Extra inputs are not permitted", which names neither the
new key nor how to convert; the message must give the line to write instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tpm_fed.federation import Federation
from tpm_fed.protocol.errors import FederationConfigError

OLD_MODEL = """
name: lab
sites:
  - {name: local}
models:
  - name: tiny
    path: models/tiny
    modes: [query, embedding, intermediary]
"""

OLD_PRICES = """
name: lab
sites:
  - {name: local}
prices:
  query: {per_1k_prompt_tokens: 3.0}
  intermediary: {per_mb_activations: 2.0}
"""


def load(tmp_path: Path, text: str) -> Federation:
    path = tmp_path / "federation.yaml"
    path.write_text(text)
    return Federation.load(path)


def test_old_modes_key_names_kinds_and_the_line_to_write(tmp_path):
    with pytest.raises(FederationConfigError) as raised:
        load(tmp_path, OLD_MODEL)
    message = str(raised.value)
    assert "Extra inputs are not permitted" not in message
    assert "models.0" in message and "'tiny'" in message
    assert "`modes` is now `kinds`" in message
    assert "kinds: [generate, embed, trace]" in message  # the old list, converted


def test_the_converted_line_loads(tmp_path):
    federation = load(tmp_path, OLD_MODEL.replace("modes: [query, embedding, intermediary]",
                                                  "kinds: [generate, embed, trace]"))
    assert federation.model("tiny").kinds == ["generate", "embed", "trace"]


def test_an_unknown_old_mode_is_named(tmp_path):
    with pytest.raises(FederationConfigError, match=r"`modes` is now `kinds`.*'chat' was never a mode"):
        load(tmp_path, OLD_MODEL.replace("intermediary", "chat"))


def test_old_price_rows_name_their_new_names(tmp_path):
    with pytest.raises(FederationConfigError) as raised:
        load(tmp_path, OLD_PRICES)
    message = str(raised.value)
    assert "Extra inputs are not permitted" not in message
    assert "prices: `query` is now `generate`" in message and "`intermediary` is now `trace`" in message
