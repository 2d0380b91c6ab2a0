"""An outcome is what one request gets back: ``{"result": ...}`` or ``{"error": ...}``."""

from __future__ import annotations

from typing import Any

from tpm_fed.protocol.errors import TpmError


def refused(error: TpmError) -> dict[str, Any]:
    """The outcome of a request refused with a typed error (rebuilt as that type by the client)."""
    return {"error": error.to_wire()}
