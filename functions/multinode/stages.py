"""Which rank holds what: the decoder layers cut into contiguous pipeline stages.

Stage ``s`` runs on rank ``s``. Rank 0 also holds everything outside the decoder
layers (token embeddings, rotary tables, final norm, unembedding), so a point is
on a later stage only when it is inside one of that stage's layers. A point's
stage is resolved here, once, from its module path.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpm_fed.protocol.errors import InvalidRequest


@dataclass(frozen=True)
class StagePlan:
    """Layers ``bounds[s]:bounds[s+1]`` run on stage (rank) ``s``.

    Attributes:
        layer_prefix: The decoder layers' module path, e.g. ``model.layers``.
        bounds: Stage boundaries, ``[0, ..., num_layers]``.
    """

    layer_prefix: str
    bounds: tuple[int, ...]

    @classmethod
    def even(cls, num_layers: int, stages: int, layer_prefix: str = "model.layers") -> StagePlan:
        """Layers spread as evenly as they go, earlier stages taking the remainder."""
        if not 1 <= stages <= num_layers:
            raise InvalidRequest(f"{stages} pipeline stages cannot split {num_layers} layers "
                                 "(each stage needs at least one layer)")
        base, extra = divmod(num_layers, stages)
        bounds = [0]
        for stage in range(stages):
            bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
        return cls(layer_prefix, tuple(bounds))

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    def layers(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def stage_of_layer(self, layer: int) -> int:
        for stage in range(self.stages):
            if layer in self.layers(stage):
                return stage
        raise InvalidRequest(f"layer {layer} is not in this model's {self.bounds[-1]} layers")

    def stage_of(self, module: str) -> int:
        """The stage holding module path ``module``: a decoder layer's own, else 0."""
        prefix = self.layer_prefix + "."
        if not module.startswith(prefix):
            return 0
        index = module[len(prefix):].split(".", 1)[0]
        return self.stage_of_layer(int(index)) if index.isdigit() else 0

    def holds(self, stage: int, parameter: str) -> bool:
        """Whether ``stage`` keeps the weight named ``parameter`` (a state-dict key)."""
        return self.stage_of(parameter) == stage and (
            stage == 0 or parameter.startswith(self.layer_prefix + "."))
