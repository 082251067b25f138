"""`--backend vllm`: decode with vLLM on a GPU, each request sent as `prompt_embeds` (optional extra:
`pip install 'p-rlhf[vllm]'`; vLLM's wheels are CUDA builds).

How a personalized policy runs on vLLM, which has no notion of a user soft prompt:

1. the run's LoRA is merged into the base weights (PEFT `merge_and_unload`) and the merged model is written to a
   temporary folder that vLLM loads with `enable_prompt_embeds=True`;
2. every request's input is built here, exactly as training laid it out: [user prefix ; token embeddings of the
   templated prompt] for that request's user (the same `ServedPolicy.prefill_inputs` the built-in engine uses, one
   row, so no padding: vLLM's positions 0..T_u+L-1 are the real positions training used);
3. vLLM batches, schedules and samples (temperature, top_p, seed, stop, n, max_tokens, min_tokens for PPO runs);
   its outputs are turned into the built-in engine's events, so the HTTP layer is the same for both backends.

The user table stays in this process: onboarding swaps it as for the built-in engine, and the next request's
prefix is built from the new table. Differences from the built-in engine: a seeded request with n > 1 draws its
choices from one generator (vLLM's), and greedy answers may differ from `PersonalizedPolicy.generate` in the last
bits (other kernels). This module is imported only with `--backend vllm`; the CPU test suite does not need vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from serving.engine import (Admitted, EventStream, GenerationRequest, QueueFull, RequestDone, SequenceDone, TextDelta,
                            validate_request)
from serving.policy import ServedPolicy

log = logging.getLogger(__name__)


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError("--backend vllm needs vLLM (a CUDA build): pip install 'p-rlhf[vllm]'; or use the "
                          "built-in engine, --backend hf") from exc
    if not torch.cuda.is_available():
        raise ImportError("--backend vllm needs a CUDA GPU; on CPU use --backend hf")


def merged_model_folder(served: ServedPolicy) -> Path:
    """The run's causal LM with its LoRA merged into the weights, saved (safetensors) with its tokenizer."""
    lm = served.run.policy.backbone.lm
    merged = lm.merge_and_unload() if hasattr(lm, "merge_and_unload") else lm
    folder = Path(tempfile.mkdtemp(prefix="prlhf-vllm-"))
    merged.save_pretrained(str(folder), safe_serialization=True)
    served.tokenizer.save_pretrained(str(folder))
    served.lm = merged  # what prefill_inputs reads the token embeddings from (LoRA does not touch them)
    return folder


class VLLMEngine:
    """The built-in `Engine`'s interface (`open`, `waiting`, `running`, `stop`) on top of vLLM's AsyncLLM."""

    def __init__(self, served: ServedPolicy, max_batch: int = 16, max_queue: int = 64,
                 gpu_memory_utilization: float = 0.8):
        _require_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs

        try:
            from vllm.v1.engine.async_llm import AsyncLLM as _Async
        except ImportError:  # older vLLM: the V0 engine class
            from vllm import AsyncLLMEngine as _Async

        self.model = served
        self.max_batch, self.max_queue = max_batch, max_queue
        self._folder = merged_model_folder(served)
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
            next(served.lm.parameters()).dtype, "auto")
        args = AsyncEngineArgs(model=str(self._folder), enable_prompt_embeds=True, max_num_seqs=max_batch,
                               dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                               max_model_len=served.max_positions)
        self.llm = _Async.from_engine_args(args)
        self._in_flight = 0
        self.stats = {"requests": 0}

    @property
    def waiting(self) -> int:
        return max(0, self._in_flight - self.max_batch)

    @property
    def running(self) -> int:
        return min(self._in_flight, self.max_batch)

    def validate(self, request: GenerationRequest) -> list[int]:
        return validate_request(self.model, self.max_batch, request)

    def open(self, requests: list[GenerationRequest]) -> "VLLMStream":
        text_ids = [self.validate(r) for r in requests]
        if self._in_flight + len(requests) > self.max_batch + self.max_queue:
            raise QueueFull(f"{self._in_flight} requests are in flight (--max-batch {self.max_batch} + "
                            f"--max-queue {self.max_queue})")
        return VLLMStream(self, requests, text_ids)

    def prompt_embeds(self, request: GenerationRequest, text_ids: list[int]):
        """([T_u + L, d] prompt embeddings on the CPU, ResolvedUser) of one request, as training laid it out."""
        users = self.model.users
        resolved = users.resolve(request.user_id, bool(text_ids))
        with torch.inference_mode():
            embeds, _, _ = self.model.prefill_inputs([request.prompt_ids], users, [resolved.index], [text_ids])
        return embeds[0].to(next(self.model.lm.parameters()).dtype).cpu(), resolved

    def sampling_params(self, request: GenerationRequest):
        from vllm import SamplingParams

        p = request.params
        return SamplingParams(n=request.n, temperature=p.temperature, top_p=p.top_p, seed=p.seed, stop=list(p.stop),
                              max_tokens=p.max_tokens, min_tokens=p.min_tokens)

    def stop(self, timeout: float = 10.0) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()
        shutil.rmtree(self._folder, ignore_errors=True)


class VLLMStream(EventStream):
    """`async for k, event in stream` over the requests' vLLM outputs (see `EventStream`)."""

    def __init__(self, engine: VLLMEngine, requests: list[GenerationRequest], text_ids: list[list[int]]):
        super().__init__(len(requests))
        self._engine = engine
        engine._in_flight += len(requests)
        self._tasks = [asyncio.get_running_loop().create_task(self._run(k, r, t))
                       for k, (r, t) in enumerate(zip(requests, text_ids))]

    async def _run(self, k: int, request: GenerationRequest, text_ids: list[int]) -> None:
        eng = self._engine
        request_id = f"prlhf-{uuid.uuid4().hex}"
        sent = [""] * request.n
        try:
            embeds, resolved = eng.prompt_embeds(request, text_ids)
            await self._queue.put((k, Admitted(resolved, len(request.prompt_ids))))
            eng.stats["requests"] += 1
            final = None
            async for out in eng.llm.generate({"prompt_embeds": embeds}, eng.sampling_params(request), request_id):
                for c in out.outputs:
                    if len(c.text) > len(sent[c.index]):
                        await self._queue.put((k, TextDelta(c.index, c.text[len(sent[c.index]):])))
                        sent[c.index] = c.text
                final = out
            for c in final.outputs:
                reason = "length" if c.finish_reason == "length" else "stop"
                await self._queue.put((k, SequenceDone(c.index, reason, c.text, list(c.token_ids))))
            await self._queue.put((k, RequestDone()))
        except asyncio.CancelledError:
            await eng.llm.abort(request_id)
            raise
        except Exception as exc:  # noqa: BLE001 - this request fails, the server goes on
            log.exception("vLLM request failed")
            await self._queue.put((k, RequestDone(error=f"internal error while decoding: {exc}")))
        finally:
            eng._in_flight -= 1

    def cancel(self) -> None:
        for t in self._tasks:
            t.cancel()
