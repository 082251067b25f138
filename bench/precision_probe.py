"""`python -m bench.precision_probe [--json FILE]`: does this CPU compute bfloat16 natively?

Prints the CPU model, the flags oneDNN uses for bf16 (avx512_bf16, amx_bf16), what `train.dtype=auto` resolves to
(`common.precision`), and the time of the matmuls one SmolLM2-135M decoder layer does on a batch of 8 x 96 tokens, in
float32 and bfloat16. Where bf16 is emulated the bf16 matmul is many times slower than the float32 one, which is why
`auto` keeps float32 there; where it is native, bf16 is the faster one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import cpu_flags, cpu_model
from common.precision import compute_dtype, native_bf16

# (rows, in, out) of one SmolLM2-135M decoder layer's projections for 8 x 96 tokens: q, k, v (GQA), o, MLP gate, up, down
SHAPES = [(768, 576, 576), (768, 576, 192), (768, 576, 192), (768, 576, 576), (768, 576, 1536), (768, 576, 1536),
          (768, 1536, 576)]


def time_matmuls(dtype: torch.dtype, repeats: int) -> float:
    """Seconds for one pass over SHAPES (median of `repeats`)."""
    g = torch.Generator().manual_seed(0)
    mats = [(torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)) for m, k, n in SHAPES]
    for a, b in mats:  # warm-up: oneDNN picks its kernels on first use
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for a, b in mats:
            a @ b
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.precision_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    model, flags = cpu_model(), [f for f in cpu_flags() if "bf16" in f or f.startswith("amx")]
    fp32 = time_matmuls(torch.float32, args.repeats)
    bf16 = time_matmuls(torch.bfloat16, max(1, min(args.repeats, 3)))
    result = {"cpu": model, "bf16_flags": flags, "native_bf16": native_bf16("cpu"),
              "auto_dtype": str(compute_dtype("auto", "cpu")).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
              "matmul_s": {"float32": fp32, "bfloat16": bf16}, "bf16_vs_fp32": bf16 / fp32}
    print(f"cpu: {model}\nbf16 flags: {', '.join(flags) or 'none'}\nnative bf16: {result['native_bf16']}; "
          f"train.dtype=auto -> {result['auto_dtype']}\none decoder layer's matmuls (8 x 96 tokens, "
          f"{result['torch_threads']} threads): float32 {fp32 * 1e3:.1f} ms, bfloat16 {bf16 * 1e3:.1f} ms "
          f"({result['bf16_vs_fp32']:.2f}x)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
