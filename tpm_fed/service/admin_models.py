"""The operator routes' request bodies (``/tpm/v1/admin``), checked where they enter.

Unknown fields are refused by name, as on every route. A site or a model
is sent as the federation file writes it: the body *is* a
:class:`~tpm_fed.federation.SiteConfig` or
:class:`~tpm_fed.federation.ModelConfig`, so it gets exactly the checks the
file gets; the whole federation is then validated again with it.
"""

from __future__ import annotations

import base64
import binascii
import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tpm_fed.federation import ModelConfig, Name, SiteConfig
from tpm_fed.protocol.adapter_architecture import Architecture
from tpm_fed.protocol.errors import InvalidRequest


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectBody(_Body):
    """``POST /tpm/v1/admin/projects``: a new project, its members and grants (SUs per site)."""

    name: str = Name
    members: list[str] = Field(default_factory=list)
    allocations: dict[str, float] = Field(default_factory=dict)


class MemberBody(_Body):
    """``POST /tpm/v1/admin/projects/{project}/members``: an identity, as its tokens name it."""

    identity: str = Field(min_length=1, max_length=256)


class GrantBody(_Body):
    """``POST /tpm/v1/admin/projects/{project}/grants``: add SUs at a site (negative takes back)."""

    site: str = Field(min_length=1)
    service_units: float

    @field_validator("service_units")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class TagBody(_Body):
    """``POST /tpm/v1/admin/models/{model}/tags``: point TAG at a stored version."""

    tag: str = Field(min_length=1, max_length=128)
    version: str = Field(default="latest", min_length=1, description="A version id prefix or a tag.")
    move: bool = Field(default=False, description="Move the tag if another version has it.")


class AdapterBody(_Body):
    """``POST /tpm/v1/admin/adapters``: an allow-listed architecture and its safetensors weights."""

    name: str = Field(min_length=1, max_length=64)
    architecture: Architecture
    weights: str = Field(description="The .safetensors file's bytes, base64 (never a pickle).")
    description: str = Field(default="", max_length=2000)

    def weights_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.weights, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("weights: not base64") from None


__all__ = ["AdapterBody", "GrantBody", "MemberBody", "ModelConfig", "ProjectBody", "SiteConfig", "TagBody"]
