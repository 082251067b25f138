"""`python experiments/sdpa_backward.py [--threads 2]`: forward + backward of SmolLM2-135M's attention (30 layers of
16 rows x 9 heads x 96 tokens x 64, causal) with PyTorch's flash-attention CPU kernel against the math backend, in
float32 and bfloat16. bench.profile_step found the bf16 training step spending a third of its time in
`_scaled_dot_product_flash_attention_for_cpu_backward` on an Intel Xeon with AMX; this isolates that kernel."""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def fwd_bwd_seconds(dtype: torch.dtype, backend: SDPBackend, reps: int, layers: int = 30) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 9, 96, 64, generator=g).to(dtype).requires_grad_() for _ in range(3))

    def once():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.float().sum().backward()

    once()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t) / reps * layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for dtype in (torch.float32, torch.bfloat16):
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            s = fwd_bwd_seconds(dtype, backend, a.reps)
            print(f"{str(dtype).replace('torch.', ''):>9} {backend.name:<16} {s * 1e3:7.0f} ms per step (30 layers)")


if __name__ == "__main__":
    main()
