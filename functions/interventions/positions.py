"""Token positions as a caller writes them, checked and mapped into a left-padded batch."""

from __future__ import annotations

from tpm_fed.protocol.errors import InvalidRequest


def resolve_positions(positions: list[int] | None, length: int, where: str) -> list[int]:
    """Positions of one prompt (negative count from the end) as indexes 0..length-1.

    Raises:
        InvalidRequest: A position falls outside the prompt.
    """
    if positions is None:
        return list(range(length))
    resolved = []
    for position in positions:
        index = position + length if position < 0 else position
        if not 0 <= index < length:
            raise InvalidRequest(
                f"{where}: position {position} is out of range for a prompt of {length} tokens "
                f"(valid: {-length}..{length - 1})"
            )
        resolved.append(index)
    return resolved
