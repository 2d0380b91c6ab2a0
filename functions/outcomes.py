"""An outcome is what one request gets back: ``{"result": ...}`` or ``{"error": ...}``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tpm_fed.protocol.errors import TpmError
from tpm_fed.protocol.results import Usage

if TYPE_CHECKING:
    from functions.backends.base import EncodedRequest
    from tpm_fed.protocol.results import Completion


def refused(error: TpmError) -> dict[str, Any]:
    """The outcome of a request refused with a typed error (rebuilt as that type by the client)."""
    return {"error": error.to_wire()}


def generated(item: EncodedRequest, completions: list[Completion]) -> dict[str, Any]:
    """The outcome of a generate request: its completions, one per prompt, and what it used."""
    usage = Usage(prompt_tokens=item.prompt_tokens, completion_tokens=sum(len(c.token_ids) for c in completions))
    return {"result": {"completions": [c.to_wire() for c in completions], "usage": usage.to_wire()}}
