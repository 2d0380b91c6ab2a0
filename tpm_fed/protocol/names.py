"""Names a caller gives (models, versions, tags, adapters) are names, never paths.

A store keeps each name as a folder or file name, so a name that could be
read as a path (``/etc/passwd``, ``../../service.log``, a NUL, a hidden
``.name``) would reach outside the store. Every such name is checked once,
against :data:`NAME_PATTERN`, where it enters (:func:`check_name`); and
every path built from one is checked again to stay under its root
(:func:`path_under`), so a name that slipped past an edge still cannot
leave it.
"""

from __future__ import annotations

import re
from pathlib import Path

from tpm_fed.protocol.errors import InvalidRequest

NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$"
"""Letters, digits, ``_ . + -``; not starting with a dot, no ``..``, 128 characters at most."""

_NAME = re.compile(NAME_PATTERN)


def is_name(text: object) -> bool:
    """Whether ``text`` is a name in the sense of :data:`NAME_PATTERN` (``\\n`` and NUL included: refused)."""
    return isinstance(text, str) and _NAME.fullmatch(text) is not None


def check_name(what: str, text: str) -> str:
    """``text`` itself, if it is a name.

    Raises:
        InvalidRequest: Not a name (the message names ``what`` and the rule, never echoes a long value).
    """
    if not is_name(text):
        shown = repr(text) if len(text) <= 80 else f"{text[:40]!r}... ({len(text)} characters)"
        raise InvalidRequest(f"{what}: {shown} is not a valid name (letters, digits, '_', '.', '+', '-'; "
                             "not starting with '.', no '..', 128 characters at most)")
    return text


def check_reference(what: str, text: str) -> str:
    """``text`` itself, if it is ``NAME`` or ``NAME@VERSION`` with both names (an adapter reference).

    Raises:
        InvalidRequest: Either part is not a name.
    """
    name, at, version = text.partition("@")
    check_name(what, name)
    if at:
        check_name(f"{what} version", version)
    return text


def path_under(root: Path, *parts: str) -> Path:
    """``root / parts...``, refused unless it stays inside ``root`` (symbolic links included).

    Raises:
        InvalidRequest: The joined path leaves ``root``.
    """
    root = Path(root)
    path = root.joinpath(*parts)
    if any("\0" in part for part in parts) or not path.resolve().is_relative_to(root.resolve()):
        raise InvalidRequest("a name reached outside its folder: names are names, never paths")
    return path
