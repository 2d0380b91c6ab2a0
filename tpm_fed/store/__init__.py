"""The model store: content-addressed, deduplicated versions of model weights."""

from tpm_fed.protocol.manifest import Manifest
from tpm_fed.store.store import ModelStore, Problem, StoreError, TensorChange, VersionInfo

__all__ = ["Manifest", "ModelStore", "Problem", "StoreError", "TensorChange", "VersionInfo"]
