"""What every entry of the federation file is built on: a strict model (frozen, unknown keys refused) and
the name field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

Name = Field(min_length=1, pattern=r"^[A-Za-z0-9_.@-]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
