"""The vLLM backend: one long-lived ``vllm.LLM`` engine per replica.

The engine runs inside the endpoint worker process (vLLM's in-process mode,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, with the ``uni`` executor when one
device serves the replica), so the worker's replica cache holds it like any
other backend. With ``tensor_parallel_size > 1`` vLLM starts one process per
GPU with its ``mp`` executor. A whole batch is handed to the engine at once,
each prompt with its own ``SamplingParams``; vLLM's scheduler does the
continuous batching and paged KV cache, and seeds are per request, so seeded
requests need no batch of their own here. While a task runs with a back
channel, requests queued for the replica join the running engine
(:mod:`functions.joining`), as they would in vLLM's own server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from functions.backends.base import EncodedRequest, encode_request, token_id_set
from functions.backends.cpu_threads import engine_threads
from functions.backends.step_size import step_limits
from functions.batch_rows import BatchRows, is_batch_line
from functions.text_deltas import ready_length
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

    def __init__(self, llm: Any, context_length: int, torch_threads_before: int,
                 batch_rows: int | None = None) -> None:
        self.llm = llm
        self.batch_rows = batch_rows  # the most batch rows in the engine at once (None: no cap)
        self.tokenizer = llm.get_tokenizer()
        self.context_length = context_length
        self.eos_token_ids = token_id_set(llm.llm_engine.model_config.hf_config.eos_token_id)
        self._torch_threads_before = torch_threads_before

    @classmethod
    def load(cls, spec: ModelSpec) -> VllmBackend:
        """Start a vLLM engine on ``spec.path`` (a store version: on this node's verified folder of it).

        Raises:
            ModelLoadError: vLLM could not start on this model, or a store version's bytes are not its own.
        """
        # Both must be set before vllm is first imported in this process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        import torch
        from vllm import LLM

        from functions.backends.interactive_first import InteractiveFirst
        from functions.policy import current_policy

        policy = current_policy()
        path = Path(spec.path)
        if spec.source == "store":
            from functions.model_cache import default_cache, materialized_version
            from tpm_fed.storage.store_reader import StoreReader

            path = materialized_version(StoreReader(path), spec.version,
                                        policy.model_cache or default_cache())
        threads = torch.get_num_threads()
        on_gpu = torch.cuda.is_available()
        if not on_gpu and spec.tensor_parallel_size == 1 and (serving := engine_threads()) is not None:
            # Leave the serving around it a core, as vLLM's own server does. torch._C's: once an engine has
            # started here, vLLM replaces torch.set_num_threads with a no-op (it binds threads in its own worker
            # processes; in-process nothing is bound, so changing the count is safe).
            torch._C.set_num_threads(serving)
        # A step's rows and tokens: vLLM's own server's, but shorter steps on a CPU (see step_size).
        step = step_limits(spec.tensor_parallel_size, path, policy.step_tokens)
        try:
            llm = LLM(
                model=str(path),
                tokenizer=str(path),
                dtype=spec.dtype,
                seed=0,
                tensor_parallel_size=spec.tensor_parallel_size,
                distributed_executor_backend="uni" if spec.tensor_parallel_size == 1 else "mp",
                # Requests carry a priority (batch lines a lower one: tpm_fed/batches/runner.py), so an
                # interactive request is scheduled before waiting batch lines; equal priorities stay FCFS.
                scheduling_policy="priority",
                # ... and running batch rows sit out the steps of interactive ones (on a CPU by default).
                scheduler_cls=InteractiveFirst,
                # CUDA graphs pay off on GPUs; on CPU eager mode is what vLLM supports best.
                enforce_eager=not on_gpu,
                disable_log_stats=True,
                **step,
            )
        except Exception as error:
            raise ModelLoadError(
                f"model {spec.name!r}: vllm could not start on {path}: {type(error).__name__}: {error}"
            ) from None
        context = int(llm.llm_engine.model_config.max_model_len)
        return cls(llm, context, threads, batch_rows=policy.batch_rows)

    def encode(self, request: GenerationRequest) -> EncodedRequest:
        return encode_request(self.tokenizer, request, self.context_length)

    def generate(self, batch: list[EncodedRequest], channel: Any = None) -> list[list[Completion]]:
        """The batch's completions. With ``channel`` (a :class:`functions.joining.JoinableTask`) the
        engine is driven step by step: streamed text leaves as it is made, each request is
        answered when it finishes, and requests may join the running batch."""
        if channel is not None:
            return self._generate_live(batch, channel)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params, priorities = [], [], []
        for item in batch:
            sampling = _sampling_params(SamplingParams, item.request)
            for ids in item.prompt_ids:
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                params.append(sampling)
                priorities.append(item.request.priority)
        outputs = iter(self.llm.generate(prompts, sampling_params=params, use_tqdm=False,
                                         **({"priority": priorities} if any(priorities) else {})))
        return [[self._completion(next(outputs)) for _ in item.prompt_ids] for item in batch]

    def _generate_live(self, batch: list[EncodedRequest], live: Any) -> list[list[Completion]]:
        """See :meth:`_run_live`. If it raises, its rows still in the engine are taken out: the next
        call (the worker answers the batch's requests apart, :mod:`functions.isolation`) would
        otherwise step them too, and ``LLM.generate`` return their outputs as its own."""
        rows: dict[str, tuple[_Running, int]] = {}  # running rows: engine request id -> (its request, prompt index)
        try:
            return self._run_live(batch, live, rows)
        except BaseException:
            unfinished = [eid for eid, (running, index) in rows.items() if running.completions[index] is None]
            if unfinished:
                self.llm.llm_engine.abort_request(unfinished)
            raise

    def _run_live(self, batch: list[EncodedRequest], live: Any,
                  rows: dict[str, tuple[_Running, int]]) -> list[list[Completion]]:
        """The engine's own step loop, as ``LLM.generate`` runs it (so the same tokens), with these
        additions: streamed rows ask for cumulative outputs and send their new text after each
        step; a request whose rows are all done is answered at once; before each step, the
        requests that joined (``live.joined()``) enter the engine, until it runs dry; and with a
        cap on batch rows (:attr:`batch_rows`), batch lines beyond it wait in the worker and enter
        as batch rows end (:mod:`functions.batch_rows`). While interactive rows run, the engine's
        scheduler pauses its batch rows (:mod:`functions.backends.interactive_first`)."""
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        share: BatchRows[_Running] = BatchRows(
            self.batch_rows, _Running.rows_left, lambda running: is_batch_line(running.item.request.priority))

        def start(running: _Running) -> None:
            item = running.item
            sampling = self._live_sampling(item.request)
            for index, ids in enumerate(item.prompt_ids):
                engine_id = f"tpm-{item.request.request_id}-{index}"
                engine.add_request(engine_id, TokensPrompt(prompt_token_ids=ids), sampling,
                                   priority=item.request.priority)
                rows[engine_id] = (running, index)
            live.started(item)

        def arrive(item: EncodedRequest) -> _Running:
            running = _Running(item)
            if share.enter(running):
                start(running)
            return running

        def finish(running: _Running, index: int, completion: Completion) -> None:
            running.completions[index] = completion
            share.row_ended(running)
            if running.done:
                live.finished(running.item, list(running.completions))

        def take_in(items: list[EncodedRequest]) -> bool:
            """``items`` arrive, and held lines that fit now enter; whether the engine has rows to step
            (when it has none, nothing is held either: it would have entered here)."""
            for item in items:
                arrive(item)
            for running in share.ready():
                start(running)
            return engine.has_unfinished_requests()

        originals = [arrive(item) for item in batch]
        sent: dict[str, int] = {}
        latest: dict[str, Any] = {}  # streamed rows' last cumulative output
        while True:
            # Run dry, the task first waits a moment for a request to join (the next one often comes just
            # after the last ended), then takes no more, serving what joined meanwhile.
            if not take_in(live.joined()) and not take_in(live.idle_joined()) and not take_in(live.close()):
                break
            # Rows whose callers left stop here, with what they made so far (charged for it). Only a
            # streamed row has a caller who can leave: the scan is of those, and only once one has.
            if live.cancelled:
                gone = live.cancelled
                for running in share.withdraw(lambda running, gone=gone: running.item.request.request_id in gone):
                    for index in range(len(running.completions)):  # held: it never ran, so nothing made
                        running.completions[index] = Completion(text="", token_ids=[], finish_reason="length")
                    live.finished(running.item, list(running.completions))
                left = [eid for eid in latest if rows[eid][0].completions[rows[eid][1]] is None
                        and rows[eid][0].item.request.request_id in gone]
                if left:
                    engine.abort_request(left)
                    for eid in left:
                        finish(*rows[eid], self._completion(latest.pop(eid)))
                        sent.pop(eid, None)
            chunks = []
            for output in engine.step():
                running, index = rows[output.request_id]
                if running.completions[index] is not None:  # stopped above: its caller left
                    continue
                request = running.item.request
                if request.stream:
                    latest[output.request_id] = output
                    text = output.outputs[0].text
                    ready = ready_length(text, request.stop, output.finished)
                    if ready > sent.get(output.request_id, 0):
                        chunks.append({"request_id": request.request_id, "index": index,
                                       "text": text[sent.get(output.request_id, 0):ready]})
                        sent[output.request_id] = ready
                if output.finished:
                    finish(running, index, self._completion(output))
                    # A task may serve thousands of requests: keep only running rows' state (the scan above).
                    del rows[output.request_id]
                    latest.pop(output.request_id, None)
                    sent.pop(output.request_id, None)
            live.send(chunks)
        return [list(running.completions) for running in originals]

    def _live_sampling(self, request: GenerationRequest) -> Any:
        """``request``'s sampling in the live loop."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # LLM.generate asks for final outputs only; the engine hands out every step's text when
        # asked for cumulative outputs, which streamed rows need.
        sampling = _sampling_params(SamplingParams, request)
        sampling.output_kind = RequestOutputKind.CUMULATIVE if request.stream else RequestOutputKind.FINAL_ONLY
        return sampling

    def _completion(self, output: Any) -> Completion:
        """The row's answer from its last output."""
        generated = output.outputs[0]
        ids = list(generated.token_ids)
        text = generated.text
        if generated.finish_reason in ("length", None):  # None: stopped because its caller left
            return Completion(text=text, token_ids=ids, finish_reason="length")
        if isinstance(generated.stop_reason, str):
            return Completion(text=text, token_ids=ids, finish_reason="stop")
        # Ended by an end-of-sequence token: like the torch backend, do not return it.
        if ids and ids[-1] in self.eos_token_ids:
            ids = ids[:-1]
        return Completion(text=text, token_ids=ids, finish_reason="eos")

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
        torch._C.set_num_threads(self._torch_threads_before)  # torch.set_num_threads may be vLLM's no-op now (load)


class _Running:
    """A request of the task (in the engine, or held until a batch row's place frees): its rows'
    completions as they come."""

    __slots__ = ("completions", "item")

    def __init__(self, item: EncodedRequest) -> None:
        self.item = item
        self.completions: list[Completion | None] = [None] * len(item.prompt_ids)

    @property
    def done(self) -> bool:
        return all(completion is not None for completion in self.completions)

    def rows_left(self) -> int:
        return sum(completion is None for completion in self.completions)


def _sampling_params(factory: Any, request: GenerationRequest) -> Any:
    """Our request's sampling fields, mapped one to one onto vLLM's (the extensions are vLLM's own names)."""
    return factory(
        max_tokens=request.max_new_tokens,
        min_tokens=request.min_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        ignore_eos=request.ignore_eos,
        stop_token_ids=request.stop_token_ids or None,
        include_stop_str_in_output=request.include_stop_str_in_output,
        seed=request.seed,
        stop=request.stop or None,
        skip_special_tokens=request.skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        # Made fresh per request, so vLLM's own copy per row (its input processor clones) may be a
        # shallow one, as its OpenAI server sets: a deep copy per row was 12% of the worker's CPU.
        skip_clone=True,
    )
