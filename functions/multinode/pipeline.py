"""Rank 0's side of a split replica: its model, with the later stages' layers standing in for the other ranks.

The first layer of stage 1 is replaced by :class:`RemoteStages`: called with the
hidden states (and what a decoder layer is called with), it sends them down the
ring of ranks (1, 2, ..., last) and waits for the last rank's hidden states. The
layers after it become :class:`Skipped` (their work happened on the other ranks).
So transformers' own ``generate``, its streamers and stopping criteria, the
tracer's hooks on rank 0's modules and the embedding path all run unchanged.

Every exchange goes around the whole ring and rank 0 gets exactly one reply for
it, so rank 0 always knows where the conversation is. The KV cache of a later
stage's layers lives on that rank, keyed by the cache object of the forward pass
that asked (a new ``generate`` call starts a new one there).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from functions.multinode import wire
from functions.multinode.stages import StagePlan
from tpm_fed.protocol.errors import ReplicaLost

_cache_ids = itertools.count(1)


class Pipeline:
    """The ring as rank 0 sees it: send to rank 1, hear back from the last rank."""

    def __init__(self, plan: StagePlan) -> None:
        self.plan = plan
        self.last = plan.stages - 1
        self.lost: ReplicaLost | None = None
        self._lock = threading.Lock()  # one exchange at a time: replies are matched by order
        self.exchanges = 0
        self.wait_s = 0.0  # time spent in send/recv: the other stages' compute plus the transport
        self.stages_s = 0.0  # of which the other stages' own compute (they report it)

    def exchange(self, message: wire.Message) -> wire.Message:
        """Send ``message`` around the ring and return what the last rank sends back.

        Raises:
            ReplicaLost: A rank is gone (now or earlier: a broken replica stays broken).
            RuntimeError: A rank raised on this message (it is still running).
        """
        with self._lock:
            if self.lost is not None:
                raise self.lost
            started = time.perf_counter()
            try:
                wire.send(message, 1)
                reply = wire.receive(self.last)
            except ReplicaLost as error:
                self.lost = error
                raise
            finally:
                self.exchanges += 1
                self.wait_s += time.perf_counter() - started
        self.stages_s += float(reply.meta.get("stage_s", 0.0))
        if reply.op == wire.FAILED:
            raise RuntimeError(f"stage {reply.meta.get('stage')} raised: {reply.meta.get('error')}")
        return reply

    def stop(self) -> None:
        """Ask the other ranks to exit (they pass the word along); no reply is awaited."""
        with self._lock:
            if self.lost is None:
                try:
                    wire.send(wire.Message(wire.STOP), 1)
                except ReplicaLost as error:
                    self.lost = error


def install(model: Any, pipeline: Pipeline) -> None:
    """Put the pipeline in place of every layer rank 0 does not hold."""
    layers = model.get_submodule(pipeline.plan.layer_prefix)
    first_remote = pipeline.plan.bounds[1]
    for index in range(first_remote, len(layers)):
        layers[index] = RemoteStages(pipeline) if index == first_remote else Skipped()
    # Nothing of the other stages is left on meta here: rank 0's memory holds only its own weights.
    assert not any(p.is_meta for p in model.parameters()), "rank 0 kept a weight it does not hold"


def cache_id(cache: Any) -> int:
    """A number naming this forward pass's KV cache on every rank (0: no cache)."""
    if cache is None:
        return 0
    number = getattr(cache, "_pipeline_cache_id", None)
    if number is None:
        number = next(_cache_ids)
        cache._pipeline_cache_id = number
    return number


def _module_base():
    import torch

    return torch.nn.Module


class RemoteStages(_module_base()):
    """Stands where stage 1 begins: the later stages' layers, run on their ranks."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, position_ids=None,
                past_key_values=None, use_cache=None, **kwargs):
        tensors = {"hidden": hidden_states, "position_ids": position_ids}
        if attention_mask is not None:
            tensors["mask"] = attention_mask
        meta = {"cache": cache_id(past_key_values if use_cache is not False else None)}
        reply = self.pipeline.exchange(wire.Message(wire.FORWARD, meta, tensors))
        return reply.tensors["hidden"]


class Skipped(_module_base()):
    """A layer of a later stage: its work was done on its rank, by :class:`RemoteStages`."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states
