"""A later rank's loop: run this stage's layers on what the previous rank sends, pass the result on.

Ranks form a ring: rank ``s`` hears from ``s - 1`` and speaks to ``s + 1`` (the
last rank to rank 0). A message this rank cannot act on (a layer raised) is
passed on as ``FAILED`` so rank 0 still gets one reply; a rank that cannot
reach its neighbours exits (the replica is lost; rank 0 sees it too).

During a trace, rank 0 sends the steps whose points live on this stage (bound to
their rows and values there) once; this rank hooks its own modules, counts the
forward passes itself (one ``FORWARD`` per pass), and at the end sends back only
what was asked for: each save (reduced here when the caller asked) and the
logit lens's rows at its layers.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from typing import Any

from functions.multinode import wire
from functions.multinode.stages import StagePlan
from tpm_fed.protocol.errors import ReplicaLost

logger = logging.getLogger(__name__)


class StageServer:
    """Serves stage ``stage`` of ``model`` until told to stop or a neighbour is lost."""

    def __init__(self, model: Any, plan: StagePlan, stage: int) -> None:
        self.model = model
        self.plan = plan
        self.stage = stage
        self.previous = stage - 1
        self.next = (stage + 1) % plan.stages
        self.layers = [model.get_submodule(f"{plan.layer_prefix}.{index}") for index in plan.layers(stage)]
        self.rotary = next((m for m in model.modules() if "RotaryEmbedding" in type(m).__name__), None)
        self.cache: Any = None
        self.cache_id = 0
        self.trace: Any = None  # functions.multinode.split_trace.StageTrace while a trace runs
        self.stopped = False  # told to stop (else: a neighbour was lost)

    @cached_property
    def catalog(self):
        """The whole architecture's points (a trace's steps here are checked against it on rank 0)."""
        from functions.multinode.split_trace import full_catalog

        return full_catalog(self.model)

    def serve(self) -> None:
        """Loop until ``STOP``; returns quietly when a neighbour is gone."""
        try:
            while True:
                message = wire.receive(self.previous)
                if message.op == wire.STOP:
                    self.stopped = True
                    if self.next != 0:
                        wire.send(message, self.next)
                    return
                wire.send(self._handle(message), self.next)
        except ReplicaLost as error:
            logger.warning("stage %d: %s; exiting", self.stage, error)

    def _handle(self, message: wire.Message) -> wire.Message:
        if message.op == wire.FAILED:
            return message
        try:
            if message.op == wire.FORWARD:
                return self._forward(message)
            if message.op == wire.TRACE_BEGIN:
                from functions.multinode.split_trace import StageTrace

                self.trace = StageTrace.begin(self, message)
                return message if self.next != 0 else wire.Message(wire.TRACE_BEGIN)
            if message.op == wire.TRACE_END:
                trace, self.trace = self.trace, None
                found = trace.finish() if trace is not None else {}
                return wire.Message(wire.TRACE_END, message.meta, {**message.tensors, **found})
            raise ValueError(f"unknown op {message.op}")
        except Exception as error:  # one message failed; the rank and the replica go on
            logger.exception("stage %d failed on op %d", self.stage, message.op)
            if message.op == wire.TRACE_END or message.op == wire.TRACE_BEGIN:
                self.trace = None
            return wire.Message(wire.FAILED, {"stage": self.stage, "error": f"{type(error).__name__}: {error}"})

    def _forward(self, message: wire.Message) -> wire.Message:
        import torch
        from transformers import DynamicCache

        number = message.meta["cache"]
        if number == 0:
            cache = None
        else:
            if number != self.cache_id:  # a new forward pass or generate call: a fresh cache
                self.cache, self.cache_id = DynamicCache(config=self.model.config), number
            cache = self.cache
        hidden = message.tensors["hidden"]
        position_ids = message.tensors["position_ids"]
        if self.trace is not None:
            self.trace.calls += 1
        started = time.perf_counter()
        with torch.no_grad():
            embeddings = self.rotary(hidden, position_ids=position_ids)
            for layer in self.layers:
                hidden = layer(hidden, attention_mask=message.tensors.get("mask"), position_embeddings=embeddings,
                               position_ids=position_ids, past_key_values=cache, use_cache=cache is not None)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
        # Each stage adds its compute time, so rank 0 can tell compute from transport (scripts/bench_multinode.py).
        meta = {**message.meta, "stage_s": message.meta.get("stage_s", 0.0) + time.perf_counter() - started}
        return wire.Message(wire.FORWARD, meta, {**message.tensors, "hidden": hidden}
                            if self.next != 0 else {"hidden": hidden})
