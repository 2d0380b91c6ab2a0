"""Keys renamed since files were written: request kinds under their names before the rename (a model's
``modes``, the price rows). Such files fail to load, and the message gives the line to write, rather than
pydantic's bare "Extra inputs are not permitted".
"""

from __future__ import annotations

from typing import Any

from tpm_fed.protocol.kinds import RENAMED_KINDS

_RENAMES = ", ".join(f"{old} -> {new}" for old, new in RENAMED_KINDS.items())


def _modes_renamed(model: str, modes: Any) -> str:
    """What to write instead of a model's old ``modes`` list."""
    old = modes if isinstance(modes, list) else [modes]
    unknown = [m for m in old if not isinstance(m, str) or m not in RENAMED_KINDS]
    if unknown:
        return (f"model {model!r}: `modes` is now `kinds` ({_RENAMES}); {unknown[0]!r} was never a mode: "
                f"write `kinds:` with some of generate, embed, trace")
    return (f"model {model!r}: `modes` is now `kinds` ({_RENAMES}): "
            f"write `kinds: [{', '.join(RENAMED_KINDS[m] for m in old)}]` instead")
