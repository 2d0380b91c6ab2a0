"""The vLLM backend: one long-lived ``vllm.LLM`` engine per replica.

The engine runs inside the endpoint worker process (vLLM's in-process mode,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, with the ``uni`` executor when one
device serves the replica), so the worker's replica cache holds it like any
other backend. With ``tensor_parallel_size > 1`` vLLM starts one process per
GPU with its ``mp`` executor. A whole batch is handed to ``LLM.generate`` at
once, each prompt with its own ``SamplingParams``; vLLM's scheduler does the
continuous batching and paged KV cache, and seeds are per request, so seeded
requests need no batch of their own here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from functions.backends.base import EncodedRequest, encode_request, token_id_set
from tpm_fed.protocol.errors import ModelLoadError
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import Completion

CPU_KV_CACHE_GIB = "1"
"""KV cache reserved on CPU nodes unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise."""


def vllm_support(architecture: str | None) -> str | None:
    """Why vLLM cannot serve this architecture here, or ``None`` if it can."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed on this worker"
    if architecture is None:
        return "the model config names no architecture"
    from vllm import ModelRegistry

    if architecture not in ModelRegistry.get_supported_archs():
        return f"vllm does not support the {architecture} architecture"
    return None


class VllmBackend:
    """A vLLM engine and its tokenizer, loaded once, answering batches."""

    name = "vllm"

    def __init__(self, llm: Any, context_length: int, torch_threads_before: int) -> None:
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.context_length = context_length
        self.eos_token_ids = token_id_set(llm.llm_engine.model_config.hf_config.eos_token_id)
        self._torch_threads_before = torch_threads_before

    @classmethod
    def load(cls, spec: ModelSpec) -> VllmBackend:
        """Start a vLLM engine on ``spec.path``.

        Raises:
            ModelLoadError: vLLM could not start on this model.
        """
        # Both must be set before vllm is first imported in this process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        import torch
        from vllm import LLM

        path = Path(spec.path)
        threads = torch.get_num_threads()
        on_gpu = torch.cuda.is_available()
        try:
            llm = LLM(
                model=str(path),
                tokenizer=str(path),
                dtype=spec.dtype,
                seed=0,
                tensor_parallel_size=spec.tensor_parallel_size,
                distributed_executor_backend="uni" if spec.tensor_parallel_size == 1 else "mp",
                # CUDA graphs pay off on GPUs; on CPU eager mode is what vLLM supports best.
                enforce_eager=not on_gpu,
                disable_log_stats=True,
            )
        except Exception as error:
            raise ModelLoadError(
                f"model {spec.name!r}: vllm could not start on {path}: {type(error).__name__}: {error}"
            ) from None
        context = int(llm.llm_engine.model_config.max_model_len)
        return cls(llm, context, threads)

    def encode(self, request: GenerationRequest) -> EncodedRequest:
        return encode_request(self.tokenizer, request, self.context_length)

    def generate(self, batch: list[EncodedRequest], channel: Any = None) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params, rows = [], [], []
        for item in batch:
            sampling = _sampling_params(SamplingParams, item.request)
            for index, ids in enumerate(item.prompt_ids):
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                params.append(sampling)
                rows.append((item.request, index))
        if channel is not None and any(request.stream for request, _ in rows):
            finished = self._generate_streaming(prompts, params, rows, channel)
        else:
            finished = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        outputs = iter(finished)
        return [[self._completion(next(outputs)) for _ in item.prompt_ids] for item in batch]

    def _generate_streaming(self, prompts: list[Any], params: list[Any], rows: list[tuple[GenerationRequest, int]],
                            channel: Any) -> list[Any]:
        """Run the batch step by step, sending streamed rows' new text after each step.

        The same engine, prompts and sampling as ``LLM.generate`` (so the same
        tokens); streamed rows ask for cumulative outputs at every step.
        """
        from vllm.sampling_params import RequestOutputKind

        from functions.streaming import ready_length

        # LLM.generate asks for final outputs only; the engine itself hands out every
        # step's text when asked for cumulative outputs. Our own ids: unique per row.
        engine = self.llm.llm_engine
        engine_ids, streamed = [], {}
        for prompt, sampling, (request, index) in zip(prompts, params, rows, strict=True):
            engine_id = f"tpm-{request.request_id}-{index}"
            sampling = sampling.clone()
            sampling.output_kind = RequestOutputKind.CUMULATIVE if request.stream else RequestOutputKind.FINAL_ONLY
            engine.add_request(engine_id, prompt, sampling)
            engine_ids.append(engine_id)
            if request.stream:
                streamed[engine_id] = (request, index)
        sent: dict[str, int] = {}
        latest: dict[str, Any] = {}  # streamed rows' last cumulative output
        finals: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            # Rows whose callers left stop here, with what they made so far (charged for it).
            left = [eid for eid, (request, _) in streamed.items()
                    if request.request_id in channel.cancelled and eid not in finals and eid in latest]
            if left:
                engine.abort_request(left)
                finals.update((eid, latest[eid]) for eid in left)
            chunks = []
            for output in engine.step():
                if output.request_id in finals:  # stopped above: its caller left
                    continue
                if output.finished:
                    finals[output.request_id] = output
                if output.request_id not in streamed:
                    continue
                latest[output.request_id] = output
                request, index = streamed[output.request_id]
                text = output.outputs[0].text
                ready = ready_length(text, request.stop, output.finished)
                if ready > sent.get(output.request_id, 0):
                    chunks.append({"request_id": request.request_id, "index": index,
                                   "text": text[sent.get(output.request_id, 0):ready]})
                    sent[output.request_id] = ready
            channel.send(chunks)
        return [finals[eid] for eid in engine_ids]

    def _completion(self, output: Any) -> Completion:
        generated = output.outputs[0]
        ids = list(generated.token_ids)
        if generated.finish_reason in ("length", None):  # None: stopped because its caller left
            return Completion(text=generated.text, token_ids=ids, finish_reason="length")
        if isinstance(generated.stop_reason, str):
            return Completion(text=generated.text, token_ids=ids, finish_reason="stop")
        # Ended by an end-of-sequence token: like the torch backend, do not return it.
        if ids and ids[-1] in self.eos_token_ids:
            ids = ids[:-1]
        return Completion(text=generated.text, token_ids=ids, finish_reason="eos")

    def close(self) -> None:
        """Stop the engine and give torch back the threads vLLM took for serving."""
        import gc

        import torch

        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.llm = None
        gc.collect()
        torch.set_num_threads(self._torch_threads_before)


def _sampling_params(factory: Any, request: GenerationRequest) -> Any:
    """Our request's sampling fields, mapped one to one onto vLLM's."""
    return factory(
        max_tokens=request.max_new_tokens,
        min_tokens=request.min_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=0,
        seed=request.seed,
        stop=request.stop or None,
        skip_special_tokens=True,
    )
