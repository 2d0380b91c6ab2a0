"""The broker: placement by locality, allocation and load; replicas on demand."""

from tpm_fed.broker.broker import Admission, Broker
from tpm_fed.broker.health import SiteHealth
from tpm_fed.broker.placement import Candidate, Decision, Placer, PlacementRequest, ReplicaView
from tpm_fed.broker.registry import ReplicaRegistry

__all__ = [
    "Admission", "Broker", "Candidate", "Decision", "Placer", "PlacementRequest", "ReplicaRegistry",
    "ReplicaView", "SiteHealth",
]
