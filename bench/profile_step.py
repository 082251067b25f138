"""`python -m bench.profile_step [--impl dpo] [--dtypes float32,bfloat16] [--json FILE]`: where a training step's
time goes, by operator, in each dtype.

The same trainer and synthetic pairs as `bench.run pdpo_step` (`--impl dpo | pdpo | pdpo_stochastic`), run by
`common.trainer.TrainLoop` for `--warmup` untimed steps, then `--steps` steps under `torch.profiler`. Prints, per
dtype, the wall time per step and the operators with the most self CPU time (their share of the profiled time), and
the totals of a few families that say what bounds the step: matmuls (`aten::mm`, `addmm`, `bmm`, `linear`
backward), dtype conversions (`aten::copy_` / `to`: autocast casting activations and float32 LoRA weights),
softmax/log-softmax over the vocabulary, elementwise ops. Use it where `bf16 / fp32` of a step is far from a
matmul's (`bench.precision_probe`): what is not a matmul does not get faster in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common.config import parse_override

FAMILIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_scaled_dot_product",
               "aten::scaled_dot_product", "mkldnn", "onednn"),
    "dtype conversion": ("aten::copy_", "aten::to", "aten::_to_copy"),
    "softmax": ("softmax", "logsumexp"),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow", "aten::rsqrt",
                    "aten::mean", "aten::neg", "aten::cat", "aten::where", "aten::exp", "aten::fill_", "aten::zero_",
                    "aten::sum", "aten::index", "aten::gather", "aten::scatter", "aten::clone"),
}


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES.items():
        if any(k.lower() in low for k in keys):
            return fam
    return "other"


def profile_impl(impl: str, dtype: str, args) -> dict:
    from bench.common import BenchArgs, bench_config, run_tmpdir, synthetic_pairs
    from bench.train_steps import DPO_VARIANTS, _build_policy_trainer, model_meta

    a = BenchArgs(name="pdpo_step", model=args.model, device="cpu", dtype=dtype, steps=args.steps,
                  warmup=args.warmup, batch=args.batch, prompt_len=args.prompt_len, response_len=args.response_len,
                  seed=args.seed)
    tok, _ = model_meta(a.model)
    pairs = synthetic_pairs(tok, a.batch * (a.warmup + a.steps), a.prompt_len, a.response_len, a.n_users, a.seed)
    kind, alpha, estimator, _ = DPO_VARIANTS[impl]
    with run_tmpdir("profile") as tmp:
        cfg = bench_config(a, Path(tmp) / impl, {"user_model.kind": kind, "loss.alpha": alpha,
                                                  "loss.estimator": estimator, **dict(args.set)})
        trainer, _, _ = _build_policy_trainer(cfg, pairs, Path(tmp) / impl, a.n_users)
        loop, inner = trainer.loop, trainer.loop.loss_fn
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        marks: dict[str, float] = {}

        def loss_fn(step: int, micro: int):
            # the profiler covers the steps after the warmup: started at the first timed step's loss, stopped when
            # the loop returns
            if step == a.warmup and micro == 0:
                prof.start()
                marks["start"] = time.perf_counter()
            return inner(step, micro)

        loop.loss_fn = loss_fn
        try:
            loop.run()
        finally:
            loop.loss_fn = inner
        wall = time.perf_counter() - marks["start"]
        prof.stop()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    ops = sorted(({"op": e.key, "self_s_per_step": e.self_cpu_time_total / 1e6 / a.steps,
                   "share": e.self_cpu_time_total / total_us, "calls_per_step": e.count / a.steps,
                   "family": family(e.key)} for e in events), key=lambda r: -r["self_s_per_step"])
    fams: dict[str, float] = {}
    for r in ops:
        fams[r["family"]] = fams.get(r["family"], 0.0) + r["share"]
    return {"impl": impl, "dtype": dtype, "step_s": wall / a.steps, "families": fams, "top_ops": ops[:args.top]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="dpo", choices=["dpo", "pdpo", "pdpo_stochastic"])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=28)
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--top", type=int, default=15, help="operators listed per dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], type=parse_override, metavar="KEY=VALUE",
                   help="a config override for the trainer, e.g. model.attn_implementation=eager (repeatable)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.common import machine_info
    from bench.run import _dtypes

    result = {"name": "profile_step", "machine": machine_info("cpu"), "settings": vars(args), "profiles": []}
    for dtype in _dtypes(args.dtypes):
        r = profile_impl(args.impl, dtype, args)
        result["profiles"].append(r)
        fams = ", ".join(f"{k} {v:.0%}" for k, v in sorted(r["families"].items(), key=lambda kv: -kv[1]))
        print(f"\n{args.impl} {dtype} {' '.join(f'{k}={v}' for k, v in args.set)}: {r['step_s']:.2f} s per step "
              f"(profiled); {fams}")
        for op in r["top_ops"]:
            print(f"  {op['op']:<45} {op['self_s_per_step'] * 1e3:9.1f} ms  {op['share']:6.1%}  "
                  f"{op['calls_per_step']:7.0f} calls  [{op['family']}]")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
