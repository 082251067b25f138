"""serve: the OpenAI-compatible server under concurrent load, one request at a time against dynamic batching.

A run (`--run RUN_DIR`, or a fresh untrained P-DPO run folder of `--model` with `--n-users` users) is served by
`pipelines.serve`'s app under uvicorn on 127.0.0.1, and `--concurrency` clients (1, 4, 16) each send streamed
greedy chat requests over HTTP until `--requests` have been answered; prompts of different lengths, users mixed
(every user of the run and one unseen user, cycled). Each level runs twice on the same server and the same
requests:

- `sequential`: the engine decodes one request at a time (`max_batch` 1): what a server without batching does;
- `batched`: up to `--batch` (default 16) rows decoded together, new requests joining between decode steps.

Rows: completion tokens per second over the level's wall time, latency p50 / p95 (request sent to last byte), time
to first token p50, `speedup` (batched over sequential at the same concurrency) and `match_sequential` (share of
identical answers: greedy batched decoding must give every request the answer it gets alone).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import BenchArgs, bench_config, run_tmpdir

PROMPTS = [
    "Hi!",
    "What is a good name for a cat?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Give me a tip for sleeping better.",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Explain what a database index is and when it helps.",
    "How can I get better at remembering people's names after meeting them once?",
    "What is the difference between weather and climate?",
    "Suggest a quick vegetarian dinner I can cook in twenty minutes with pasta, tomatoes and whatever is in a "
    "typical fridge.",
    "How do I politely decline an invitation?",
    "What are the benefits of learning a second language as an adult, and how should I start?",
    "Tell me about bees.",
    "How do noise-cancelling headphones work?",
    "What is compound interest? Explain it with a small example using round numbers, please.",
    "Why do onions make you cry?",
]


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def make_policy_run(a: BenchArgs, folder: Path) -> Path:
    """An untrained P-DPO run folder of `a.model` (LoRA at its zero init, user rows at their init): the serving
    cost does not depend on what the weights learned."""
    import torch

    from common.config import dump_yaml
    from common.run import build_backbone, save_artifacts, write_run_info
    from preference_data.vocab import UserVocab

    extra = {"user_model.kind": "individual"}
    if a.n_tokens:
        extra["user_model.n_tokens"] = a.n_tokens
    cfg = bench_config(a, folder, extra)
    vocab = UserVocab(f"user_{i + 1}" for i in range(a.n_users))
    vocab.save(folder / "users.json")
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    backbone, _ = build_backbone(cfg, len(vocab), torch.device("cpu"))
    save_artifacts(folder, backbone, {})
    write_run_info(folder, cfg, "train_pdpo", backbone, vocab, extra={"route": "dpo"})
    return folder


async def _drive(base_url: str, model: str, jobs: list[dict], concurrency: int, max_tokens: int) -> list[dict]:
    """`concurrency` clients take jobs from one queue until none is left; one result per job, in job order."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, job in enumerate(jobs):
        queue.put_nowait((i, job))
    results: list[dict | None] = [None] * len(jobs)
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)

    async def client(http):
        while not queue.empty():
            i, job = queue.get_nowait()
            body = {"model": model, "messages": [{"role": "user", "content": job["prompt"]}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            if job["user"] is not None:
                body["user"] = job["user"]
            t0 = time.perf_counter()
            first, text, tokens = None, [], 0
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"request {i}: HTTP {resp.status_code}: {await resp.aread()}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"request {i}: {chunk['error']}")
                    for ch in chunk.get("choices", []):
                        piece = ch.get("delta", {}).get("content")
                        if piece:
                            first = first if first is not None else time.perf_counter() - t0
                            text.append(piece)
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            results[i] = {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens, "text": "".join(text)}

    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return results


def run_serve(a: BenchArgs) -> list[dict[str, Any]]:
    from serving.app import create_app
    from serving.server import BackgroundServer
    from serving.service import load_service

    # serve's own options (set by bench.run on top of BenchArgs' fields)
    serve_run = a.serve_run
    levels = tuple(a.concurrency or (1, 4, 16))
    n_requests = a.requests or 16
    a = replace(a, batch=a.batch or 16)
    max_batch = a.batch
    rows: list[dict[str, Any]] = []
    with run_tmpdir("serve") as tmp:
        run_dir = Path(serve_run) if serve_run else make_policy_run(a, Path(tmp) / "run")
        service = load_service(run_dir, a.device, max_batch=max_batch, max_queue=max(64, max(levels)),
                               max_new_tokens=a.max_new_tokens, max_prompt_tokens=4096)
        users = service.users.vocab().ids + [None, "unseen-user"]  # every user, the generic one and an unseen id
        jobs = [{"prompt": PROMPTS[i % len(PROMPTS)], "user": users[(3 * i) % len(users)]} for i in range(n_requests)]
        engine = service.engine
        with BackgroundServer(create_app(service)) as srv:
            asyncio.run(_drive(srv.base_url, service.model_id, jobs[:2], 2, 2))  # warm-up: both code paths
            for c in levels:
                answers = {}
                for impl in ("sequential", "batched"):
                    if not a.want(impl):
                        continue
                    engine.max_batch = 1 if impl == "sequential" else max_batch
                    t0 = time.perf_counter()
                    res = asyncio.run(_drive(srv.base_url, service.model_id, jobs, c, a.max_new_tokens))
                    wall = time.perf_counter() - t0
                    answers[impl] = [r["text"] for r in res]
                    tokens = sum(r["tokens"] for r in res)
                    lat = [r["latency"] for r in res]
                    ttft = [r["ttft"] for r in res if r["ttft"] is not None]
                    row = {"impl": impl, "concurrency": c, "requests": len(res), "tokens": tokens,
                           "seconds": wall, "tokens_per_s": tokens / wall, "max_batch": engine.max_batch,
                           "p50_latency_s": statistics.median(lat), "p95_latency_s": _percentile(lat, 0.95),
                           "p50_ttft_s": statistics.median(ttft) if ttft else None,
                           "max_new_tokens": a.max_new_tokens, "users": len(set(j["user"] for j in jobs))}
                    seq = next((r for r in rows if r["impl"] == "sequential" and r["concurrency"] == c), None)
                    if impl == "batched" and seq is not None:
                        row["speedup"] = row["tokens_per_s"] / seq["tokens_per_s"]
                        row["match_sequential"] = sum(
                            x == y for x, y in zip(answers["batched"], answers["sequential"])) / len(res)
                    rows.append(row)
            engine.max_batch = max_batch
    return rows
