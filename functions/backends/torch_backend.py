"""The torch backend: transformers ``AutoModelForCausalLM`` from a local directory.

Requests that can share a forward pass are batched: all greedy requests go
together, sampled ones together when their temperature, top_p, top_k and
min_p agree (and in both cases only with the same min_new_tokens,
ignore_eos and repetition_penalty). A
request with a seed runs alone so its samples do not depend on who else was
in the batch. Prompts are left-padded with an attention mask, as
``model.generate`` expects for decoder-only models.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cached_property
from pathlib import Path
from typing import Any

from functions.backends.base import EncodedRequest, encode_request, token_id_set
from functions.backends.stopping import finish_row
from tpm_fed.protocol.errors import InvalidRequest, ModelLoadError
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import Completion

MAX_ROWS_PER_CALL = 64
"""Rows handed to one ``generate`` call; larger groups are split."""

VLLM_ONLY = {
    "stop_token_ids": "stop token ids",
    "skip_special_tokens": "special tokens in the text (skip_special_tokens false)",
    "spaces_between_special_tokens": "special tokens without spaces (spaces_between_special_tokens false)",
    "include_stop_str_in_output": "the stop string kept in the text (include_stop_str_in_output)",
}
"""vLLM's extensions this backend does not take, refused by name: each would need its own rule in
the cut of a padded row and in the streamed deltas, and none is needed by vLLM's benchmark client.
(ignore_eos, top_k, min_p, repetition_penalty and min_tokens are implemented; priority is taken and
has nothing to reorder: a task's whole batch runs in one ``generate``.)"""


class TorchBackend:
    """A causal LM and its tokenizer, loaded once, answering batches."""

    name = "torch"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        self.context_length = int(model.config.max_position_embeddings)
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = token_id_set(eos if eos is not None else tokenizer.eos_token_id)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids, default=0)

    @property
    def device(self) -> Any:
        """Where the model's weights are (inputs are made there)."""
        return self.model.device

    @classmethod
    def load(cls, spec: ModelSpec, device: Any = "cpu") -> TorchBackend:
        """Load weights (safetensors only) and tokenizer from ``spec.path`` onto ``device``.

        Raises:
            ModelLoadError: The directory is missing, incomplete or corrupt.
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if spec.source == "store":
            backend = cls._load_from_store(spec)
            backend.model.to(device)
            return backend
        path = Path(spec.path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model {spec.name!r}: {path} is not a model directory (no config.json)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, spec.dtype), use_safetensors=True
            ).to(device)
        except Exception as error:  # transformers raises many types for bad files
            raise ModelLoadError(
                f"model {spec.name!r}: could not load {path}: {type(error).__name__}: {error}"
            ) from None
        return cls(model, tokenizer)

    @classmethod
    def _load_from_store(cls, spec: ModelSpec) -> TorchBackend:
        """Build the model without initializing weights, then take the store's tensors as they are."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.initialization import no_init_weights

        from functions.store_loader import load_state_dict, materialize_files
        from tpm_fed.storage.store_reader import StoreReader

        store = StoreReader(Path(spec.path))
        files = materialize_files(store, spec.version)
        tensors = load_state_dict(store, spec.version)
        dtype = getattr(torch, spec.dtype)
        # Served in the dtype asked for, as from_pretrained does from a folder (a bfloat16
        # version served as float32, or the reverse), not in the dtype it was stored in.
        tensors = {name: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
                   for name, t in tensors.items()}
        try:
            with no_init_weights():
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(files), dtype=dtype)
            # A tied output embedding (tie_word_embeddings) is not saved, so not stored:
            # only those keys may be missing; tie_weights() then points them at their source.
            missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
            untied = sorted(set(missing) - set(getattr(model, "all_tied_weights_keys", None) or {}))
            if untied or unexpected:
                raise RuntimeError(f"missing tensors {untied}, unexpected tensors {sorted(unexpected)}")
            model.tie_weights()
            tokenizer = AutoTokenizer.from_pretrained(files)
        except Exception as error:
            raise ModelLoadError(
                f"model {spec.name!r}: could not build version {spec.version[:16]}: {type(error).__name__}: {error}"
            ) from None
        return cls(model, tokenizer)

    def encode(self, request: GenerationRequest) -> EncodedRequest:
        """Tokenize, after refusing the vLLM extensions this backend does not take (by name).

        Raises:
            InvalidRequest: The request sets one of :data:`VLLM_ONLY`.
            ContextLengthExceeded: A prompt plus max_new_tokens does not fit.
        """
        refused = [name for name in VLLM_ONLY if name in request.set_extensions()]
        if refused:
            raise InvalidRequest(
                f"{', '.join(refused)}: the torch backend does not take "
                f"{'; '.join(VLLM_ONLY[name] for name in refused)}; the vllm backend does "
                f"(send backend: vllm, on a model vLLM serves)")
        return encode_request(self.tokenizer, request, self.context_length)

    def generate(self, batch: list[EncodedRequest], channel: Any = None) -> list[list[Completion]]:
        completions: dict[int, list[Completion]] = {}
        for group in _compatible_groups(batch).values():
            rows = [(index, ids) for index, item in group for ids in item.prompt_ids]
            finished: list[Completion] = []
            request_of_row = [batch[index].request for index, item in group for _ in item.prompt_ids]
            prompt_of_row = [prompt for _, item in group for prompt in range(len(item.prompt_ids))]
            for start in range(0, len(rows), MAX_ROWS_PER_CALL):
                chunk = rows[start : start + MAX_ROWS_PER_CALL]
                requests = request_of_row[start : start + MAX_ROWS_PER_CALL]
                stream = self._streamer(requests, prompt_of_row[start : start + MAX_ROWS_PER_CALL], channel)
                finished.extend(self._generate_rows([ids for _, ids in chunk], requests, stream))
            for (index, _), completion in zip(rows, finished, strict=True):
                completions.setdefault(index, []).append(completion)
        return [completions[index] for index in range(len(batch))]

    def _streamer(self, requests: list[GenerationRequest], prompts: list[int], channel: Any) -> Any:
        """The rows' stream (None: nothing streams): a transformers streamer that sends the streamed
        rows' new text to ``channel``, and a stopping criterion that ends the rows whose callers left."""
        if channel is None or not any(request.stream for request in requests):
            return None
        import torch
        from transformers import StoppingCriteria
        from transformers.generation.streamers import BaseStreamer

        from functions.text_deltas import TextDeltas

        deltas = TextDeltas([(r.request_id, prompt, r.max_new_tokens, r.stop) if r.stream else None
                             for r, prompt in zip(requests, prompts, strict=True)],
                            self._decode, self._ends(requests[0]))
        row_ids = [r.request_id for r in requests]

        class Streamer(BaseStreamer):
            prompt_seen = False
            width = 0

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() hands over the prompt first
                    self.prompt_seen, self.width = True, value.shape[-1]
                    return
                channel.send(deltas.step(value.reshape(-1).tolist()))

            def end(self) -> None:
                pass

        class CallerLeft(StoppingCriteria):
            """Ends the rows of requests the service says were abandoned (their batch-mates go on)."""

            def __init__(self) -> None:
                self.stopped_at: dict[int, int] = {}  # row -> tokens generated when it was stopped

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                generated = input_ids.shape[1] - streamer.width
                for row, request_id in enumerate(row_ids):
                    if row not in self.stopped_at and request_id in channel.cancelled:
                        self.stopped_at[row] = generated
                        deltas.done[row] = True
                return torch.tensor([row in self.stopped_at for row in range(len(row_ids))],
                                    dtype=torch.bool, device=input_ids.device)

        streamer = Streamer()
        return streamer, CallerLeft()

    def _generate_rows(self, rows: list[list[int]], requests: list[GenerationRequest],
                       stream: Any = None) -> list[Completion]:
        import torch
        from transformers import StoppingCriteriaList

        streamer, caller_left = stream if stream is not None else (None, None)

        first = requests[0]  # the group shares its sampling settings and min_new_tokens
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if not first.greedy:  # top_k and min_p narrow sampling only, as in vLLM
            sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p,
                        "top_k": first.top_k, "min_p": first.min_p or None}
            if first.seed is not None:
                torch.manual_seed(first.seed)
        if first.repetition_penalty != 1.0:  # greedy too, as in vLLM; over prompt and output tokens
            sampling["repetition_penalty"] = first.repetition_penalty
        if first.ignore_eos:  # as vLLM: end-of-sequence tokens are generated like any other, not suppressed
            sampling["eos_token_id"] = []
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(r.max_new_tokens for r in requests),
                min_new_tokens=first.min_new_tokens,
                pad_token_id=self.pad_token_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([caller_left]) if caller_left else None,
                **sampling,
            )
        stopped_at = caller_left.stopped_at if caller_left else {}
        return [
            finish_row(
                output[row, width:].tolist(),
                # A row whose caller left keeps the tokens made until then (and is charged for them).
                max_new_tokens=min(request.max_new_tokens, stopped_at.get(row, request.max_new_tokens)),
                eos_token_ids=self._ends(request),
                stop=request.stop,
                decode=self._decode,
            )
            for row, request in enumerate(requests)
        ]

    def _ends(self, request: GenerationRequest) -> set[int]:
        """The tokens that end a row of this request: none with ignore_eos."""
        return set() if request.ignore_eos else self.eos_token_ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @cached_property
    def tracer(self):
        """Runs trace requests (mode 3) on this model; its point catalog is probed on first use."""
        from functions.interventions.tracer import Tracer

        return Tracer(self.model, self.tokenizer, self.context_length, self.eos_token_ids, self.pad_token_id)

    def close(self) -> None:
        self.model = None  # the weights go with the last reference
        self.__dict__.pop("tracer", None)


def _compatible_groups(batch: list[EncodedRequest]) -> dict[tuple, list[tuple[int, EncodedRequest]]]:
    """Requests that may share one ``generate`` call, keyed by sampling settings."""
    groups: dict[tuple, list[tuple[int, EncodedRequest]]] = defaultdict(list)
    for index, item in enumerate(batch):
        request = item.request
        if request.greedy:
            key: tuple = ("greedy",)
        elif request.seed is not None:
            key = ("seeded", request.request_id)
        else:
            key = ("sampled", request.temperature, request.top_p, request.top_k, request.min_p)
        groups[(request.min_new_tokens, request.ignore_eos, request.repetition_penalty, *key)].append((index, item))
    return groups
