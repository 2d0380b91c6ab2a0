"""Run one :class:`~tpm_fed.interventions.TraceRequest` on a loaded torch model.

Every step becomes work inside a forward hook on the module it names (a
pre-hook for ``.input``; for heads, a pre-hook on the attention's output
projection, whose input holds the heads side by side). The prompts run as
one left-padded batch, so a patch can copy from one prompt to another in
the same pass. Steps are checked against the replica's own point catalog
(by the same function the client uses, :func:`tpm_fed.protocol.validation.check_spec`)
before anything runs, and the result's size is known (and refused above
the endpoint's limit) before the forward pass too. A caller's python hook is
unpacked only when the endpoint's policy runs callers' code, and only after
every other check has passed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from functions.interventions.positions import resolve_positions
from functions.policy import WorkerPolicy
from tpm_fed.protocol.errors import InvalidRequest, PayloadTooLarge
from tpm_fed.protocol.interventions import Inject, Patch, Point
from tpm_fed.protocol.points import PointCatalog, probe_points
from tpm_fed.protocol.requests import TraceRequest
from tpm_fed.protocol.validation import check_context, check_spec, step_label


@dataclass
class _Bound:
    """A step (or the caller's hook) tied to the rows and indexes it acts on."""

    step: Any
    point: Point
    rows: dict[int, list[int]]  # prompt -> token indexes in its own prompt
    sources: dict[int, tuple[int, list[int]]] = field(default_factory=dict)  # patch: target -> (source, indexes)
    value: Any = None  # a tensor already in the model's dtype, shaped for the selection


class Tracer:
    """Traces for one replica (the point catalog is probed once)."""

    def __init__(self, model: Any, tokenizer: Any, context_length: int, eos_token_ids: set[int], pad_token_id: int):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.catalog: PointCatalog = probe_points(model)

    def run(self, request: TraceRequest, *, policy: WorkerPolicy) -> dict[str, Any]:
        """Answer ``request``: ``{"tensors_blob": safetensors bytes, "prompt_tokens", "prompt_texts", "vocab", "texts", "completions",
        "usage"}``.

        Args:
            request: The trace.
            policy: This endpoint's policy: whether the caller's python hooks may run,
                and the largest result (inline, or by reference where the endpoint has a store).

        Raises:
            NotPermitted: The request carries Python code and this endpoint does not run callers' code.
            InvalidRequest: A point, head, position, tensor or index does not fit this model.
            PayloadTooLarge: The result would be over the endpoint's limit.
        """
        from tpm_fed.protocol.tensors import pack_tensors

        if request.python_hooks:  # first, so a refused request's code is never unpacked
            policy.check_caller_code("python_hooks")
        check_spec(request, self.catalog)  # what the client checked too, against this model
        prompt_ids = self.tokenize(request)
        self.check_size(request.result_bytes(self.catalog, [len(ids) for ids in prompt_ids], self.item_bytes), policy)
        tensors, reply = self.execute(request, prompt_ids, policy=policy)
        blob = pack_tensors(tensors)  # its size is checked where it is delivered (functions.references)
        return {"tensors_blob": blob, **reply, "usage": {**reply["usage"], "activation_bytes": len(blob)}}

    def tokenize(self, request: TraceRequest) -> list[list[int]]:
        """Each prompt's token ids; refuses prompts that leave no room for ``max_new_tokens``."""
        prompt_ids = [self.tokenizer(p)["input_ids"] for p in request.prompts]
        check_context(request.max_new_tokens, self.context_length, [len(ids) for ids in prompt_ids])
        return prompt_ids

    @property
    def item_bytes(self) -> int:
        import torch

        return torch.finfo(self.model.dtype).bits // 8

    def check_size(self, expected: int, policy: WorkerPolicy) -> None:
        """Refuse, before anything runs, a result larger than this endpoint returns."""
        if expected > policy.result_limit:
            by_reference = "" if policy.result_store else " (this endpoint has no store for results by reference)"
            raise PayloadTooLarge(
                f"the result would be {expected:,} bytes; this endpoint returns at most {policy.result_limit:,}"
                f"{by_reference}: save fewer points or positions, reduce them on the worker, or split the prompts"
            )

    def execute(self, request: TraceRequest, prompt_ids: list[list[int]], *, policy: WorkerPolicy,
                values: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run a checked trace: its tensors by name (torch), and the rest of its reply.

        Args:
            values: In a session, ``value_from -> tensor``: what earlier steps saved.
        """
        import torch

        lengths = [len(ids) for ids in prompt_ids]
        bound = [self._bind(index, step, request, lengths, values) for index, step in enumerate(request.steps)]
        bound += [self._bind_hook(hook, policy) for hook in request.python_hooks]
        run = _Run(self, request, prompt_ids, bound)
        with torch.no_grad():
            outputs = run.forward()
        return run.reply(outputs)

    def _bind(self, index: int, step, request: TraceRequest, lengths: list[int], values: Any = None) -> _Bound:
        """Tie a step (already checked by :func:`check_spec`) to the token indexes it acts on."""
        import torch

        where = step_label(index, step)
        prompts = step.prompts or [p for p in range(len(lengths)) if not (isinstance(step, Patch) and p == step.source)]
        rows = {p: resolve_positions(step.positions, lengths[p], where) for p in prompts}
        bound = _Bound(step, step.address, rows)
        if isinstance(step, Patch):
            for target, indexes in rows.items():
                source = resolve_positions(step.source_positions or step.positions, lengths[step.source], where)
                if len(source) != len(indexes):
                    raise InvalidRequest(f"{where}: prompt {target} has {len(indexes)} positions to patch but the "
                                         f"source prompt {step.source} gives {len(source)}; name the positions")
                bound.sources[target] = (step.source, source)
        if step.op in ("set", "add"):
            value = step.value.torch() if step.value is not None else values(step.value_from)
            bound.value = value.to(device=self.model.device, dtype=self.model.dtype)
        if isinstance(step, Inject):
            ids = self.tokenizer(step.text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise InvalidRequest(f"{where}: text {step.text!r} has no tokens")
            embeddings = self.model.get_input_embeddings()
            bound.value = embeddings(torch.tensor(ids, device=self.model.device)).sum(dim=0) * step.scale
        return bound

    def _bind_hook(self, hook, policy: WorkerPolicy) -> _Bound:
        function = policy.load_caller_code(hook.code, "python_hooks")
        return _Bound(step=_CallerHook(function), point=Point.parse(hook.point), rows={})


@dataclass(frozen=True)
class _CallerHook:
    """The caller's own function: called with the whole tensor at every forward call (prompt and each new token)."""

    function: Any
    op: str = "python"
    generated: bool = True


class _Run:
    """One forward pass (or one generation) with the hooks in place."""

    def __init__(self, tracer: Tracer, request: TraceRequest, prompt_ids: list[list[int]], bound: list[_Bound]):
        self.tracer = tracer
        self.model = tracer.model
        self.catalog = tracer.catalog
        self.request = request
        self.prompt_ids = prompt_ids
        self.lengths = [len(ids) for ids in prompt_ids]
        self.width = max(self.lengths)
        self.pads = [self.width - length for length in self.lengths]
        self.bound = bound
        self.calls = 0
        self.saved: dict[str, list[Any]] = defaultdict(list)
        self.layer_outputs: dict[int, Any] = {}
        self.head_inputs: dict[int, Any] = {}

    # -- running -------------------------------------------------------------------------------

    def forward(self):
        import torch

        input_ids = torch.full((len(self.prompt_ids), self.width), self.tracer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(self.prompt_ids):
            input_ids[row, self.pads[row]:] = torch.tensor(ids)
            mask[row, self.pads[row]:] = 1
        input_ids, mask = input_ids.to(self.model.device), mask.to(self.model.device)
        handles = self._register()
        patterns = self.request.attention_patterns is not None
        previous = self.model.config._attn_implementation
        try:
            if patterns:  # only eager attention materializes the weights
                self.model.set_attn_implementation("eager")
            if self.request.max_new_tokens == 0:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 output_attentions=patterns)
                return {"attentions": out.attentions if patterns else None, "sequences": None}
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=self.request.max_new_tokens,
                do_sample=False, pad_token_id=self.tracer.pad_token_id, output_attentions=patterns,
                return_dict_in_generate=True,
            )
            return {"attentions": out.attentions[0] if patterns else None, "sequences": out.sequences}
        finally:
            for handle in handles:
                handle.remove()
            if patterns:
                self.model.set_attn_implementation(previous)

    def _holds(self, module_name: str) -> bool:
        """Whether this process holds ``module_name`` (a split replica's stage holds only some)."""
        return True

    def _register(self) -> list[Any]:
        handles = [self.model.register_forward_pre_hook(self._count), *self._register_edits()]
        # Analyses read what the edits left (registered after them, so they run after them).
        lens_layers = set()
        if self.request.logit_lens is not None:
            lens_layers = {self._layer_index(i) for i in self.request.logit_lens.layers or range(len(self.catalog.layers))}
        for index in sorted(i for i in lens_layers if self._holds(self.catalog.layers[i])):
            module = self.model.get_submodule(self.catalog.layers[index])
            handles.append(module.register_forward_hook(self._capture(self.layer_outputs, index)))
        if self.request.attention_lens is not None:
            for index in self._attention_layers():
                name, info = self.catalog.attention_of(index)
                if not self._holds(info.out_projection):
                    continue
                module = self.model.get_submodule(info.out_projection)
                handles.append(module.register_forward_pre_hook(self._capture_input(self.head_inputs, index)))
        return handles

    def _register_edits(self) -> list[Any]:
        """The steps' hooks on the modules this process holds, one per module and side (a head's edits
        go where the heads enter the output projection)."""
        handles = []
        by_target: dict[tuple[str, str], list[_Bound]] = defaultdict(list)
        for item in self.bound:
            point = item.point
            if not self._holds(point.module):
                continue
            if point.head is not None:
                by_target[(self.catalog.attention[point.module].out_projection, "input")].append(item)
            else:
                by_target[(point.module, point.side)].append(item)
        for (module_name, side), items in by_target.items():
            module = self.model.get_submodule(module_name)
            if side == "input":
                handles.append(module.register_forward_pre_hook(self._input_hook(items), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(self._output_hook(items)))
        return handles

    def _count(self, module, args):
        self.calls += 1

    def _input_hook(self, items: list[_Bound]):
        def hook(module, args, kwargs):
            if args:
                return (self._apply(items, args[0]), *args[1:]), kwargs
            key = next(k for k, v in kwargs.items() if hasattr(v, "shape"))
            return args, {**kwargs, key: self._apply(items, kwargs[key])}
        return hook

    def _output_hook(self, items: list[_Bound]):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (self._apply(items, output[0]), *output[1:])
            return self._apply(items, output)
        return hook

    def _capture(self, into: dict, index: int):
        def hook(module, args, output):
            if self.calls == 1:
                into[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def _capture_input(self, into: dict, index: int):
        def hook(module, args):
            if self.calls == 1:
                into[index] = args[0]
        return hook

    # -- the steps -----------------------------------------------------------------------------

    def _apply(self, items: list[_Bound], tensor):
        import torch

        prompt_phase = self.calls == 1
        edits = any(item.step.op != "save" for item in items)
        edited = tensor.clone(memory_format=torch.contiguous_format) if edits else tensor
        for item in items:
            if not prompt_phase and not item.step.generated:
                continue
            if isinstance(item.step, _CallerHook):
                replaced = item.step.function(edited)
                if replaced is not None:
                    edited = replaced.to(edited.dtype).reshape(edited.shape).contiguous()
                continue
            for prompt, indexes in item.rows.items():
                where = [self.pads[prompt] + i for i in indexes] if prompt_phase else [edited.shape[1] - 1]
                self._do(item, edited, prompt, where, prompt_phase)
        return edited

    def _do(self, item: _Bound, tensor, prompt: int, where: list[int], prompt_phase: bool) -> None:
        step, point = item.step, item.point
        if step.op == "save":
            self.saved[f"{prompt}:{step.key}"].append(self._get(tensor, point, prompt, where).clone())
        elif step.op == "set":
            self._put(tensor, point, prompt, where, item.value)
        elif step.op in ("add", "inject"):
            self._put(tensor, point, prompt, where, self._get(tensor, point, prompt, where) + item.value)
        elif step.op == "scale":
            self._put(tensor, point, prompt, where, self._get(tensor, point, prompt, where) * step.factor)
        elif step.op == "ablate":
            self._put(tensor, point, prompt, where, 0.0)
        elif step.op == "patch":
            source, source_indexes = item.sources[prompt]
            source_where = [self.pads[source] + i for i in source_indexes] if prompt_phase else where
            self._put(tensor, point, prompt, where, self._get(tensor, point, source, source_where).clone())

    def _heads(self, tensor, point: Point):
        info = self.catalog.attention[point.module]
        return tensor.reshape(*tensor.shape[:2], info.heads, info.head_dim)

    def _get(self, tensor, point: Point, row: int, where: list[int]):
        if point.head is None:
            return tensor[row, where]
        heads = self._heads(tensor, point)
        return heads[row, where] if point.head == "*" else heads[row, where, point.head]

    def _put(self, tensor, point: Point, row: int, where: list[int], value) -> None:
        if point.head is None:
            tensor[row, where] = value
            return
        heads = self._heads(tensor, point)  # a view: the tensor is contiguous when edited
        if point.head == "*":
            heads[row, where] = value
        else:
            heads[row, where, point.head] = value

    # -- the reply -----------------------------------------------------------------------------

    def reply(self, outputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch

        tensors = saved_tensors(self.saved, self.request.steps)
        vocab_ids: set[int] = set()
        if self.request.logit_lens is not None:
            vocab_ids |= self._logit_lens(tensors)
        if self.request.attention_lens is not None:
            vocab_ids |= self._attention_lens(tensors)
        if outputs["attentions"] is not None:
            layers = [self._layer_index(i) for i in self.request.attention_patterns.layers or range(len(self.catalog.layers))]
            for prompt, pad in enumerate(self.pads):
                tensors[f"{prompt}:attention_patterns"] = torch.stack(
                    [outputs["attentions"][layer][prompt, :, pad:, pad:].float() for layer in layers]
                )
        completions = self._completions(outputs["sequences"])
        decode = self.tracer.tokenizer.convert_ids_to_tokens
        return tensors, {
            "prompt_tokens": [decode(ids) for ids in self.prompt_ids],
            "prompt_texts": [[self._text(i) for i in ids] for ids in self.prompt_ids],
            "vocab": {str(i): decode(i) for i in sorted(vocab_ids)},
            "texts": {str(i): self._text(i) for i in sorted(vocab_ids)},
            "completions": [c.to_wire() for c in completions],
            "usage": {
                "prompt_tokens": sum(self.lengths),
                "completion_tokens": sum(len(c.token_ids) for c in completions),
                "activation_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            },
        }

    def _text(self, token_id: int) -> str:
        """One token as the text it stands for (' is' where its vocabulary piece is 'Ġis')."""
        return self.tracer.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)

    def _decode_top(self, hidden, top_k: int):
        import torch

        if self.catalog.final_norm is not None:
            hidden = self.model.get_submodule(self.catalog.final_norm)(hidden)
        logits = self.model.get_submodule(self.catalog.unembedding)(hidden).float()
        probs, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        return ids.to(torch.int32), probs

    def _logit_lens(self, tensors: dict) -> set[int]:
        import torch

        lens = self.request.logit_lens
        seen: set[int] = set()
        for prompt, (pad, length) in enumerate(zip(self.pads, self.lengths, strict=True)):
            indexes = [pad + i for i in resolve_positions(lens.positions, length, "logit_lens")]
            layers = sorted(self.layer_outputs)
            hidden = torch.stack([self.layer_outputs[layer][prompt, indexes] for layer in layers])
            ids, probs = self._decode_top(hidden, lens.top_k)
            tensors[f"{prompt}:logit_lens.ids"], tensors[f"{prompt}:logit_lens.probs"] = ids, probs
            seen |= set(ids.flatten().tolist())
        return seen

    def _attention_lens(self, tensors: dict) -> set[int]:
        import torch

        lens = self.request.attention_lens
        seen: set[int] = set()
        layers = self._attention_layers()
        for prompt, (pad, length) in enumerate(zip(self.pads, self.lengths, strict=True)):
            indexes = [pad + i for i in resolve_positions(lens.positions, length, "attention_lens")]
            per_layer = []
            for layer in layers:
                per_layer.append(self._head_contributions(layer, prompt, indexes, lens.heads))
            ids, probs = self._decode_top(torch.stack(per_layer), lens.top_k)
            tensors[f"{prompt}:attention_lens.ids"], tensors[f"{prompt}:attention_lens.probs"] = ids, probs
            seen |= set(ids.flatten().tolist())
        return seen

    def _head_contributions(self, layer: int, prompt: int, indexes: list[int], heads: list[int] | None):
        """What each head of ``layer`` adds to the residual stream at ``indexes`` of ``prompt``: [heads, positions, hidden]."""
        import torch

        _, info = self.catalog.attention_of(layer)
        heads = heads or list(range(info.heads))  # in range: check_spec saw to it
        weight = self.model.get_submodule(info.out_projection).weight
        z = self.head_inputs[layer][prompt, indexes].view(len(indexes), info.heads, info.head_dim)
        return torch.stack([z[:, head] @ weight[:, head * info.head_dim:(head + 1) * info.head_dim].T
                            for head in heads])

    def _completions(self, sequences):
        from functions.backends.stopping import finish_row

        if sequences is None:
            return []
        decode = lambda ids: self.tracer.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return [
            finish_row(sequences[row, self.width:].tolist(), max_new_tokens=self.request.max_new_tokens,
                       eos_token_ids=self.tracer.eos_token_ids, stop=[], decode=decode)
            for row in range(len(self.lengths))
        ]

    def _layer_index(self, index: int) -> int:
        self.catalog.layer(index)
        return index % len(self.catalog.layers)

    def _attention_layers(self) -> list[int]:
        lens = self.request.attention_lens
        return sorted({self._layer_index(i) for i in lens.layers or range(len(self.catalog.layers))})


def saved_tensors(saved: dict[str, list[Any]], steps: list[Any]) -> dict[str, Any]:
    """What the saves recorded (``PROMPT:KEY`` -> rows, prompt phase then each generated token),
    one tensor each, reduced where its step asked."""
    import torch

    reductions = {step.key: step.reduce for step in steps if step.op == "save" and step.reduce}
    tensors: dict[str, Any] = {}
    for name, parts in saved.items():
        whole = torch.cat(parts, dim=0)
        reduce = reductions.get(name.split(":", 1)[1])
        tensors[name] = whole if reduce is None else _reduced(whole, reduce)
    return tensors


def _reduced(saved, reduce):
    """``saved`` reduced as the caller asked, computed in float32 and returned in the model's dtype."""
    import torch

    values = saved.float()
    if reduce.op == "project":
        vectors = reduce.vectors.torch().float().to(values.device)
        return (values @ vectors.T).to(saved.dtype)
    dim = reduce.dim(values.dim())
    if reduce.op == "mean":
        out = values.mean(dim=dim)
    elif reduce.op == "max":
        out = values.amax(dim=dim)
    else:
        out = torch.linalg.vector_norm(values, dim=dim)
    return out.to(saved.dtype)
