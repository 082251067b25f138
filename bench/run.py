"""`python -m bench.run NAME --model M --device cpu|cuda --json FILE [options]`

NAME:
  pdpo_step    seconds per optimizer step: TRL DPOTrainer (trl_dpo), our vanilla DPO (dpo: uniform user model,
               alpha=1), P-DPO exact (pdpo), P-DPO stochastic estimator (pdpo_stochastic)
  rm_step      seconds per optimizer step: TRL RewardTrainer (trl_rm), our vanilla RM (rm), personalized RM (prm,
               alpha=0.5 exact), personalized RM with the stochastic estimator (prm_stochastic)
  ppo_rollout  rollout tokens/s: per-example generate loop (naive) vs one batched generate (batched); and the time
               split of one PPO iteration (ppo_iteration: generate / score / reference / policy+value / train)
  user_scale   parameter + optimizer-state bytes and step time of the individual and cluster user models at
               10 .. 1M users, dense AdamW vs row-sparse optimizers; rows that do not fit are skipped with an estimate
  serve        the OpenAI-compatible server (pipelines.serve) at 1, 4, 16 concurrent clients with mixed users: tokens/s
               and p50/p95 latency, one request at a time (sequential) vs dynamic batching (batched)

Writes {"name", "machine", "rows": [{"impl", ...}], ...} to --json and prints a table. See bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

NAMES = ("pdpo_step", "rm_step", "ppo_rollout", "user_scale", "serve")

TABLE_COLUMNS = {
    "pdpo_step": ["impl", "step_s", "vs_trl_dpo", "rows_per_step", "seq_len", "tokens", "tflops_per_s", "mfu",
                  "step_s_min", "step_s_max", "n_timed"],
    "rm_step": ["impl", "step_s", "vs_trl_rm", "rows_per_step", "seq_len", "tokens", "tflops_per_s", "mfu",
                "step_s_min", "step_s_max", "n_timed"],
    "ppo_rollout": ["impl", "tokens_per_s", "seconds", "tokens", "batch", "speedup", "match_naive", "generate_s",
                    "score_s", "reference_s", "policy_value_s", "train_s", "iteration_s", "response_tokens"],
    "user_scale": ["impl", "users", "kind", "optim", "dtype", "bytes", "gb", "step_s", "batch_rows", "changed_rows",
                   "skipped"],
    "serve": ["impl", "concurrency", "requests", "tokens", "seconds", "tokens_per_s", "speedup", "p50_latency_s",
              "p95_latency_s", "p50_ttft_s", "match_sequential"],
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(x)) for x in text.split(",") if x.strip())


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=NAMES)
    p.add_argument("--model", default="tiny-random", help="tiny-random | smollm2-135m | local folder | hub id")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--json", default=None, help="write the result here (JSON)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the LLM (train.dtype; a LoRA LLM is stored in it, trained parts stay "
                        "float32); TRL gets the LLM in that dtype too (and bf16=True on a GPU)")
    p.add_argument("--dtypes", default=None, metavar="D1,D2",
                   help="pdpo_step, rm_step, ppo_rollout: run every impl in each of these dtypes in the same run "
                        "(with --rounds the (impl, dtype) pairs rotate together); rows carry `dtype`, ratios to TRL "
                        "are within a dtype")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch", type=int, default=None,
                   help="pairs per step (pdpo_step, rm_step: 8), prompts per rollout (ppo_rollout: 16), "
                        "users per step (user_scale: 16)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens of the synthetic data")
    p.add_argument("--response-len", type=int, default=64, help="response tokens of the synthetic data")
    p.add_argument("--n-users", type=int, default=10, help="users of the synthetic data (LLM benchmarks)")
    p.add_argument("--n-tokens", type=int, default=None,
                   help="T_u, user soft-prompt tokens (default: the config's 4; user_scale: 10)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak for --dtype (e.g. 989 for H100 SXM bf16): adds MFU fields")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--impls", default=None, help="comma-separated subset of the impl rows to run")
    p.add_argument("--rounds", type=int, default=1,
                   help="pdpo_step / rm_step: run the impls this many times, the order rotated each round (so that "
                        "no impl always runs first or after the heaviest), and report the median of all their steps")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("ppo_rollout")
    g.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens generated per prompt (EOS suppressed for naive/batched, so every row has this many)")
    g.add_argument("--sample", action="store_true", help="fixed-seed sampling instead of greedy decoding")
    g.add_argument("--no-ppo-iteration", action="store_true", help="skip the PPO iteration time split")
    g = p.add_argument_group("user_scale")
    g.add_argument("--users", default="10,1000,100000,1000000", help="comma-separated user counts")
    g.add_argument("--dim", type=int, default=576, help="d, width of the soft prompt (SmolLM2-135M: 576)")
    g.add_argument("--clusters", type=int, default=100, help="K of the cluster user model")
    g.add_argument("--optims", default="adamw,sparse_adam,rowwise_adagrad",
                   help="adamw (the project's dense optimizer) | sparse_adam (sparse grads + torch SparseAdam) | "
                        "rowwise_adagrad (sparse grads, one state value per row)")
    g.add_argument("--max-gb", type=float, default=None,
                   help="memory budget per configuration (default: 40%% of available host RAM / 80%% of free "
                        "GPU memory); larger ones are skipped with their estimate")
    g.add_argument("--no-bf16-fallback", action="store_true",
                   help="do not retry a float32 table that does not fit as bfloat16")
    g = p.add_argument_group("serve (also: --batch = the server's max batch, 16; --max-new-tokens per request)")
    g.add_argument("--run", default=None,
                   help="serve this finished policy run (default: an untrained P-DPO run of --model, --n-users users)")
    g.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent clients")
    g.add_argument("--requests", type=int, default=16, help="requests answered per concurrency level and impl")
    return p


def _dtypes(text: str) -> tuple[str, ...]:
    out = _strs(text)
    bad = [d for d in out if d not in ("float32", "bfloat16")]
    if bad or not out:
        raise SystemExit(f"--dtypes: expected float32 and/or bfloat16, got {text!r}")
    return out


def args_from_cli(ns: argparse.Namespace):
    from bench.common import BenchArgs

    n_tokens = ns.n_tokens if ns.n_tokens is not None else (10 if ns.name == "user_scale" else None)
    a = BenchArgs(
        name=ns.name, model=ns.model, device=ns.device, dtype=ns.dtype, steps=ns.steps, warmup=ns.warmup,
        dtypes=_dtypes(ns.dtypes) if ns.dtypes else None,
        batch=ns.batch, prompt_len=ns.prompt_len, response_len=ns.response_len, n_users=ns.n_users,
        n_tokens=n_tokens, lr=ns.lr, peak_tflops=ns.peak_tflops, threads=ns.threads,
        impls=list(_strs(ns.impls)) if ns.impls else None, rounds=ns.rounds, max_new_tokens=ns.max_new_tokens,
        sample=ns.sample,
        ppo_iteration=not ns.no_ppo_iteration, users=_ints(ns.users), dim=ns.dim, clusters=ns.clusters,
        optims=_strs(ns.optims), max_gb=ns.max_gb, bf16_fallback=not ns.no_bf16_fallback, seed=ns.seed,
        serve_run=ns.run, concurrency=_ints(ns.concurrency), requests=ns.requests)
    return a


def run_benchmark(a) -> dict:
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if a.steps < 1 or a.warmup < 0 or a.rounds < 1:
        raise SystemExit("--steps and --rounds must be >= 1 and --warmup >= 0")
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _run(a)
    finally:
        torch.set_num_threads(threads)  # the process's own setting again (tests run benchmarks in-process)


def _run(a) -> dict:
    import torch

    from bench.common import machine_info, versions

    t0 = time.time()
    if a.name == "pdpo_step":
        from bench.train_steps import run_pdpo_step as fn
    elif a.name == "rm_step":
        from bench.train_steps import run_rm_step as fn
    elif a.name == "ppo_rollout":
        from bench.rollout import run_ppo_rollout as fn
    elif a.name == "serve":
        from bench.serve import run_serve as fn
    else:
        from bench.user_scale import run_user_scale as fn
    rows = fn(a)
    settings = {k: v for k, v in vars(a).items() if k != "name"}
    settings["torch_threads"] = torch.get_num_threads()
    settings["env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")}
    return {"name": a.name, "machine": machine_info(a.device), "device": a.device, "model": a.model,
            "dtype": ",".join(a.dtypes) if a.dtypes else a.dtype, "versions": versions(), "settings": settings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": time.time() - t0, "rows": rows}


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "trl", "datasets", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    a = args_from_cli(ns)
    result = run_benchmark(a)

    from bench.common import format_table

    print(f"# {result['name']} | {result['model']} | {result['device']} {result['dtype']} | {result['machine']}")
    cols = [c for c in TABLE_COLUMNS[a.name] if any(c in r for r in result["rows"])]
    if any("dtype" in r for r in result["rows"]):
        cols.insert(1, "dtype")
    print(format_table(result["rows"], cols))
    if ns.json:
        path = Path(ns.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    # command line only (tests call main() in-process and keep their own environment)
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is first imported: before the project loads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
