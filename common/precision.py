"""Compute precision: the dtype the frozen LLM is stored and run in (`train.dtype`, `model.dtype`).

With LoRA (or a frozen LLM) the base weights never change, so storing them in bfloat16 costs nothing in quality
that bf16 matmuls do not already cost, and halves the bytes every matmul reads: on CPUs with native bf16 matrix
instructions (AVX512-BF16, AMX: AMD Zen 4, Intel Sapphire Rapids and later) and on GPUs that is most of the speed.
Everything that is trained stays float32 (master weights): LoRA adapters (PEFT keeps them float32 and casts its
input), the user model (its prefix is cast to the token embeddings' dtype where it is prepended) and the heads
(their input is cast to their float32 weights). Autocast covers the rest (a full fine-tune keeps float32 weights).

`auto` picks bfloat16 where the device computes it natively, float32 elsewhere. `PRLHF_AUTO_DTYPE` overrides what
`auto` means (the test suite pins it to float32 so that its numbers are the same on every machine).
"""

from __future__ import annotations

import contextlib
import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` has bf16 matrix instructions (not emulated through float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def compute_dtype(train_dtype: str, device: torch.device | str) -> torch.dtype:
    """`train.dtype` resolved for `device`."""
    if train_dtype == "auto":
        pinned = os.environ.get("PRLHF_AUTO_DTYPE")
        if pinned:
            if pinned not in DTYPES:
                raise ValueError(f"PRLHF_AUTO_DTYPE must be one of {list(DTYPES)}, got {pinned!r}")
            return DTYPES[pinned]
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return DTYPES[train_dtype]


def storage_dtype(model_dtype: str, finetune: str, compute: torch.dtype) -> torch.dtype:
    """`model.dtype` resolved: `auto` stores a LoRA or frozen LLM in the compute dtype; a full fine-tune keeps
    float32 master weights (autocast computes in the lower precision)."""
    if model_dtype != "auto":
        return DTYPES[model_dtype]
    return compute if finetune in ("lora", "frozen") else torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype):
    """Autocast to `dtype` on `device` (nothing for float32)."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
