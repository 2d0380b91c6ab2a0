"""The torch backend on a replica split into pipeline stages over several ranks ("nodes").

This worker is rank 0: it starts the other ranks (:mod:`functions.multinode.launcher`),
holds the embeddings, the first stage's layers, the final norm and the
unembedding, and serves exactly as :class:`~functions.backends.torch_backend.TorchBackend`
does (batched and streamed ``generate``, ``embed``, traces and sessions): the
later stages' layers are one module that runs them on their ranks
(:mod:`functions.multinode.pipeline`). A rank lost at any time fails the replica
as a whole with :class:`~tpm_fed.protocol.errors.ReplicaLost`, after every other
rank is stopped.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from functions.backends.torch_backend import TorchBackend
from functions.multinode.launcher import LocalLauncher, launcher_here
from functions.multinode.pipeline import Pipeline, install
from tpm_fed.protocol.errors import ModelLoadError, ReplicaLost
from tpm_fed.protocol.model import ModelSpec

JOIN_TIMEOUT_S = 600.0
"""How long rank 0 waits for every rank to load its weights and join."""


class PipelineBackend(TorchBackend):
    """Rank 0 of a split replica."""

    def __init__(self, model: Any, tokenizer: Any, pipeline: Pipeline, launcher: LocalLauncher) -> None:
        super().__init__(model, tokenizer)
        self.pipeline = pipeline
        self.launcher = launcher
        self.stages = pipeline.plan.stages

    @classmethod
    def load(cls, spec: ModelSpec, launcher: LocalLauncher | None = None) -> PipelineBackend:
        """Start ranks 1..N-1, load stage 0 here meanwhile, and join them.

        Raises:
            ModelLoadError: This stage or another rank could not load (the others are stopped).
        """
        from transformers import AutoConfig, AutoTokenizer

        from functions.multinode.stage_model import load_stage, stage_plan

        try:
            config = AutoConfig.from_pretrained(Path(spec.path))
        except Exception as error:  # transformers raises many types for a bad folder
            raise ModelLoadError(f"model {spec.name!r}: cannot read its config: {type(error).__name__}") from None
        stage_plan(spec, config)  # a split this model cannot take is refused before any rank starts
        launcher = launcher or launcher_here()
        world_size = spec.pipeline_parallel_size
        started = time.perf_counter()
        launcher.start(spec, world_size)
        try:
            model, plan = load_stage(spec, 0)
            tokenizer = AutoTokenizer.from_pretrained(Path(spec.path))
            loaded = time.perf_counter()
            _join(launcher, world_size)
        except BaseException:
            launcher.kill()
            raise
        pipeline = Pipeline(plan)
        install(model, pipeline)
        backend = cls(model, tokenizer, pipeline, launcher)
        # Where a cold start goes: rank 0's own stage, then waiting for the slowest other rank to load and join.
        backend.start_timings = {"stage0_load_s": loaded - started, "join_wait_s": time.perf_counter() - loaded}
        return backend

    def generate(self, batch, channel=None):
        return self._guarded(super().generate, batch, channel)

    def _guarded(self, run, *args):
        """``run(*args)``; a lost rank ends the whole replica (every rank stopped) before it is raised."""
        try:
            return run(*args)
        except ReplicaLost:
            self.fail()
            raise
        except RuntimeError:
            if self.pipeline.lost is not None:  # raised through transformers, which may wrap it
                self.fail()
                raise self.pipeline.lost from None
            raise

    @cached_property
    def tracer(self):
        """Traces whose points may live on any stage (:mod:`functions.multinode.split_trace`)."""
        from functions.multinode.split_trace import SplitTracer

        return SplitTracer(self.model, self.tokenizer, self.context_length, self.eos_token_ids, self.pad_token_id,
                           self.pipeline, guard=self._guarded)

    def fail(self) -> None:
        """The replica is lost: kill every rank now and leave the process group."""
        self.launcher.kill()
        _leave_group()

    def close(self) -> None:
        if self.pipeline.lost is None:
            self.pipeline.stop()
            self.launcher.stop()
        else:
            self.launcher.kill()
        _leave_group()
        super().close()


def _join(launcher: LocalLauncher, world_size: int) -> None:
    """Join the process group as rank 0, watching the ranks meanwhile: one that exits ends the wait."""
    import torch.distributed as dist

    joined: dict[str, BaseException | None] = {}

    def join() -> None:
        try:
            dist.init_process_group("gloo", init_method=f"tcp://{launcher.host}:{launcher.port}", rank=0,
                                    world_size=world_size, timeout=timedelta(seconds=JOIN_TIMEOUT_S))
            joined["error"] = None
        except BaseException as error:  # noqa: BLE001 - reported below
            joined["error"] = error

    thread = threading.Thread(target=join, name="pipeline-join", daemon=True)
    thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while thread.is_alive():
        thread.join(0.1)
        for rank, code in launcher.exited():
            raise ModelLoadError(f"rank {rank} of the split replica exited ({code}) while loading: "
                                 f"{launcher.log_tail(rank)}")
        if time.monotonic() > deadline:
            raise ModelLoadError(f"the ranks of the split replica did not all join within {JOIN_TIMEOUT_S:.0f} s")
    if joined.get("error") is not None:
        raise ModelLoadError(f"the split replica's ranks could not join: {joined['error']}")


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group may refuse a clean exit; it is gone either way
            pass
