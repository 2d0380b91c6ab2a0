"""Traces on a split replica: every step runs on the rank that holds its point.

Rank 0 checks and binds the whole trace as on one process (the same
:class:`~functions.interventions.tracer.Tracer` code: tokenizing, positions,
values, injected embeddings, session values), then resolves each step's stage
once from its point (:meth:`StagePlan.stage_of`). Its own steps hook its own
modules; the steps of a later stage cross to that rank once, before the forward
pass, already bound (rows, patch sources, the value in the model's dtype). What
comes back, after the pass, is only what was asked for: each save (reduced
there when the caller asked) and, for the logit lens, the hidden rows at its
positions at that stage's layers (decoded on rank 0, which holds the final norm
and unembedding). A patch or edit on stage 0 changes the hidden states that
cross to stage 1, exactly as on one process.

The attention lens of a later stage's layer is computed there too (each head's
contribution at the lens positions) and decoded on rank 0. Not on later stages
yet (refused, typed): attention patterns and callers' python hooks.
"""

from __future__ import annotations

from typing import Any

from functions.interventions.tracer import Tracer, _Bound, _Run, saved_tensors
from functions.multinode import wire
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.interventions import Point
from tpm_fed.protocol.points import probe_points
from tpm_fed.protocol.requests import TraceRequest


def full_catalog(model: Any):
    """The points of the whole architecture (probed on ``meta``: rank 0 does not hold every layer)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    return probe_points(skeleton.eval())


class SplitTracer(Tracer):
    """The tracer of rank 0 of a split replica."""

    def __init__(self, model: Any, tokenizer: Any, context_length: int, eos_token_ids: set[int],
                 pad_token_id: int, pipeline: Any, guard: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.pipeline = pipeline
        self.plan = pipeline.plan
        self.guard = guard  # the backend's: a lost rank ends the replica
        self.catalog = full_catalog(model)

    def execute(self, request: TraceRequest, prompt_ids: list[list[int]], *, policy: Any,
                values: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch

        self._refuse_unsupported(request)
        lengths = [len(ids) for ids in prompt_ids]
        bound = [self._bind(index, step, request, lengths, values) for index, step in enumerate(request.steps)]
        bound += [self._bind_hook(hook, policy) for hook in request.python_hooks]
        run = _SplitRun(self, request, prompt_ids, bound)
        begin = _begin_message(self.plan, run, bound)

        def traced():
            self.pipeline.exchange(begin)
            try:
                with torch.no_grad():
                    outputs = run.forward()
            finally:
                found = self.pipeline.exchange(wire.Message(wire.TRACE_END))
            run.take(found.tensors)
            return run.reply(outputs)

        return self.guard(traced)

    def _refuse_unsupported(self, request: TraceRequest) -> None:
        later = "lives on a later pipeline stage of this split replica"
        if request.attention_patterns is not None:
            raise InvalidRequest("attention_patterns are not returned by a replica split into pipeline stages "
                                 "(yet); ask a one-node replica")
        for hook in request.python_hooks:
            if self.plan.stage_of(Point.parse(hook.point).module) != 0:
                raise InvalidRequest(f"python hook at {hook.point}: the point {later}; not supported there yet")


class _SplitRun(_Run):
    """A run on rank 0: hooks only its own modules; takes the later stages' results in."""

    def _holds(self, module_name: str) -> bool:
        return self.tracer.plan.stage_of(module_name) == 0

    def lens_layers(self) -> list[int]:
        lens = self.request.logit_lens
        if lens is None:
            return []
        return sorted({self._layer_index(i) for i in lens.layers or range(len(self.catalog.layers))})

    def lens_rows(self, lens: Any = None, label: str = "logit_lens") -> dict[int, list[int]]:
        """Prompt -> the rows (in the padded batch) a lens reads (the logit lens unless named)."""
        from functions.interventions.positions import resolve_positions

        lens = lens or self.request.logit_lens
        return {prompt: [pad + i for i in resolve_positions(lens.positions, length, label)]
                for prompt, (pad, length) in enumerate(zip(self.pads, self.lengths, strict=True))}

    def attention_lens_layers(self) -> list[int]:
        return self._attention_layers() if self.request.attention_lens is not None else []

    def _head_contributions(self, layer, prompt, indexes, heads):
        if self.tracer.plan.stage_of(self.catalog.layers[layer]) == 0:
            return super()._head_contributions(layer, prompt, indexes, heads)
        return self.remote_heads[(layer, prompt)]

    def take(self, found: dict[str, Any]) -> None:
        """The later stages' saves and lens rows, put where the one-process run keeps its own."""
        import torch

        self.remote: dict[str, Any] = {}
        self.remote_heads: dict[tuple[int, int], Any] = {}
        rows = self.lens_rows() if self.request.logit_lens is not None else {}
        for name, tensor in found.items():
            kind, _, rest = name.partition("/")
            if kind == "save":
                self.remote[rest] = tensor
            elif kind == "heads":  # one layer's head contributions for one prompt, computed on its stage
                layer, prompt = (int(part) for part in rest.split("/"))
                self.remote_heads[(layer, prompt)] = tensor
            elif kind == "lens":  # [rows of every prompt, hidden] -> a [batch, width, hidden] the lens indexes
                layer = int(rest)
                full = torch.zeros(len(self.lengths), self.width, tensor.shape[-1], dtype=tensor.dtype)
                cursor = 0
                for prompt, indexes in rows.items():
                    full[prompt, indexes] = tensor[cursor:cursor + len(indexes)]
                    cursor += len(indexes)
                self.layer_outputs[layer] = full

    def reply(self, outputs):
        tensors, rest = super().reply(outputs)
        if self.remote:
            tensors.update(self.remote)
            rest["usage"]["activation_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
        return tensors, rest


def _begin_message(plan, run: _SplitRun, bound: list[_Bound]) -> wire.Message:
    """What each later stage needs to run its steps: the steps bound there, and its lens layers."""
    steps: dict[str, list[dict[str, Any]]] = {}
    tensors: dict[str, Any] = {}
    for index, item in enumerate(bound):
        stage = plan.stage_of(item.point.module)
        if stage == 0:
            continue
        steps.setdefault(str(stage), []).append({
            "index": index, "step": item.step.model_dump(mode="json"),
            "rows": {str(p): i for p, i in item.rows.items()},
            "sources": {str(t): [s, i] for t, (s, i) in item.sources.items()},
            "point": str(item.point)})
        if item.value is not None:
            tensors[f"value/{index}"] = item.value
    lens: dict[str, list[int]] = {}
    for layer in run.lens_layers():
        stage = plan.stage_of(run.catalog.layers[layer])
        if stage != 0:
            lens.setdefault(str(stage), []).append(layer)
    heads: dict[str, list[int]] = {}
    for layer in run.attention_lens_layers():
        stage = plan.stage_of(run.catalog.layers[layer])
        if stage != 0:
            heads.setdefault(str(stage), []).append(layer)
    attention_lens = run.request.attention_lens
    meta = {"prompt_lengths": run.lengths, "steps": steps, "lens": lens,
            "lens_rows": {str(p): r for p, r in run.lens_rows().items()} if lens else {},
            "heads": heads, "heads_of": attention_lens.heads if heads else None,
            "heads_rows": ({str(p): r for p, r in run.lens_rows(attention_lens, "attention_lens").items()}
                           if heads else {})}
    return wire.Message(wire.TRACE_BEGIN, meta, tensors)


class StageTrace:
    """A trace's steps on one later rank: hooks on its modules while the trace runs."""

    def __init__(self, server: Any, run: _Run, lens_rows: dict[int, list[int]], handles: list[Any],
                 heads_rows: dict[int, list[int]], heads_of: list[int] | None) -> None:
        self.server = server
        self.run = run
        self.lens_rows = lens_rows
        self.handles = handles
        self.heads_rows = heads_rows
        self.heads_of = heads_of

    @property
    def calls(self) -> int:
        return self.run.calls

    @calls.setter
    def calls(self, value: int) -> None:
        self.run.calls = value

    @classmethod
    def begin(cls, server: Any, message: wire.Message) -> StageTrace:
        from pydantic import TypeAdapter

        from tpm_fed.protocol.interventions import Step

        meta = message.meta
        stage = str(server.stage)
        step_type = TypeAdapter(Step)
        bound = []
        for wired in meta["steps"].get(stage, []):
            step = step_type.validate_python(wired["step"])
            item = _Bound(step=step, point=Point.parse(wired["point"]),
                          rows={int(p): i for p, i in wired["rows"].items()},
                          sources={int(t): (s, i) for t, (s, i) in wired["sources"].items()},
                          value=message.tensors.get(f"value/{wired['index']}"))
            bound.append(item)
        run = _StageRun(server, bound, meta["prompt_lengths"])
        handles = run.register_stage([int(layer) for layer in meta["lens"].get(stage, [])],
                                     [int(layer) for layer in meta["heads"].get(stage, [])])
        return cls(server, run, {int(p): r for p, r in meta["lens_rows"].items()}, handles,
                   {int(p): r for p, r in meta["heads_rows"].items()}, meta["heads_of"])

    def finish(self) -> dict[str, Any]:
        import torch

        for handle in self.handles:
            handle.remove()
        found = {f"save/{name}": t for name, t in saved_tensors(self.run.saved, self.run.steps).items()}
        for layer, hidden in self.run.layer_outputs.items():
            found[f"lens/{layer}"] = torch.cat([hidden[prompt, rows] for prompt, rows in sorted(self.lens_rows.items())])
        for layer in self.run.head_inputs:
            for prompt, rows in self.heads_rows.items():
                found[f"heads/{layer}/{prompt}"] = self.run._head_contributions(layer, prompt, rows, self.heads_of)
        return found


class _StageRun(_Run):
    """The hooks of one later stage: the one-process run's own step code, on this rank's modules."""

    def __init__(self, server: Any, bound: list[_Bound], lengths: list[int]) -> None:
        self.tracer = None
        self.model = server.model
        self.catalog = server.catalog
        self.plan = server.plan
        self.stage = server.stage
        self.request = None
        self.lengths = lengths
        self.width = max(lengths)
        self.pads = [self.width - length for length in lengths]
        self.bound = bound
        self.steps = [item.step for item in bound]
        self.calls = 0  # counted by the stage server: one FORWARD per forward pass
        from collections import defaultdict

        self.saved = defaultdict(list)
        self.layer_outputs: dict[int, Any] = {}
        self.head_inputs: dict[int, Any] = {}

    def register_stage(self, lens_layers: list[int], head_layers: list[int]) -> list[Any]:
        handles = self._register_edits()  # every bound step is this stage's: the stage server bound only those
        for layer in lens_layers:  # after the edits: the lens reads what they left
            module = self.model.get_submodule(self.catalog.layers[layer])
            handles.append(module.register_forward_hook(self._capture(self.layer_outputs, layer)))
        for layer in head_layers:  # the heads side by side, where they enter the output projection
            _, info = self.catalog.attention_of(layer)
            module = self.model.get_submodule(info.out_projection)
            handles.append(module.register_forward_pre_hook(self._capture_input(self.head_inputs, layer)))
        return handles

