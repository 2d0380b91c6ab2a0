"""Who is calling. Pluggable: the OS user in the embedded default, Globus Auth later."""

from __future__ import annotations

import getpass
from typing import Protocol


class IdentityProvider(Protocol):
    def current(self) -> str:
        """The caller's identity, as project member lists name it."""
        ...


class LocalUser:
    """The operating-system user running this process."""

    def current(self) -> str:
        return getpass.getuser()
