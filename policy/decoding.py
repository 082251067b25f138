"""Batched decoding with the KV cache in which a row leaves the batch at its EOS.

transformers' `generate` keeps every row until the last one ends: a finished row goes on decoding padding. In a PPO
rollout of the demo (40 rows; the majority's answers about 60 tokens, the minority's about 15, a few run to
`max_new_tokens`) that is about 40 % of the row-steps. Here a finished row is dropped from the batch and from the KV
cache (`DynamicCache.batch_select_indices`, as the serving engine's continuous batching does), so a step costs what
the unfinished rows cost.

The layout and rules are `generate`'s: left-padded [pads, prefix, prompt] rows, positions counting real tokens only,
EOS ruled out for the first `min_new_tokens`, then the greedy token or a sample from softmax(logits / T)
(`policy.sampling.sample_tokens`). What `generate` does beyond that (top-k / top-p, repetition penalties, beams) is
left to it: `plain_decoding` says whether a call's keyword arguments ask for anything else. Greedy answers equal
`generate`'s up to float rounding of the changing batch shape (exactly, on the test suite's tiny model).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from policy.sampling import sample_tokens


@dataclass(frozen=True)
class Decoding:
    """What `decode` does: greedy (temperature None) or sampling from the full softmax(logits / temperature)."""

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    min_new_tokens: int = 0
    temperature: float | None = None


# generate() keyword arguments that `decode` implements when they have these values (anything else: generate)
_NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "num_beams": (None, 1),
            "use_cache": (None, True), "top_k": (None, 0), "top_p": (None, 1.0)}
_OWN = {"max_new_tokens", "min_new_tokens", "eos_token_id", "do_sample", "temperature"}


def plain_decoding(gen_kwargs: dict, default_eos) -> Decoding | None:
    """The `Decoding` that `generate(**gen_kwargs)` asks for, or None where it asks for more than `decode` does."""
    for key, value in gen_kwargs.items():
        if key in _OWN:
            continue
        if key not in _NEUTRAL or value not in _NEUTRAL[key]:
            return None
    if gen_kwargs.get("max_new_tokens") is None:
        return None
    eos = gen_kwargs.get("eos_token_id", default_eos)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    temperature = None
    if gen_kwargs.get("do_sample"):  # generate's default temperature is 1; 0 or less is refused by sample_tokens
        temperature = 1.0 if gen_kwargs.get("temperature") is None else float(gen_kwargs["temperature"])
    return Decoding(int(gen_kwargs["max_new_tokens"]), tuple(int(e) for e in eos),
                    int(gen_kwargs.get("min_new_tokens") or 0), temperature)


@torch.no_grad()
def decode(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, how: Decoding,
           greedy_rows: torch.Tensor | None = None) -> list[list[int]]:
    """New tokens of each left-padded row of (`inputs_embeds` [B, L, d], `attention_mask` [B, L]), each cut after
    its first EOS (no EOS: `how.max_new_tokens` tokens). `greedy_rows` [B] bool: rows decoded greedily in a
    sampling batch (they still draw their random number, so the other rows' draws do not depend on which)."""
    device = inputs_embeds.device
    mask = attention_mask.long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True,
             logits_to_keep=1)
    cache_arg = cache_kwarg(lm)
    cache, logits = returned_cache(out), out.logits[:, -1]
    next_pos = mask.sum(1)
    rows = torch.arange(inputs_embeds.shape[0], device=device)  # which input row each batch row is
    results: list[list[int]] = [[] for _ in range(inputs_embeds.shape[0])]
    eos = torch.tensor(how.eos_ids, dtype=torch.long, device=device)
    for step in range(how.max_new_tokens):
        if step < how.min_new_tokens and len(eos):
            logits = logits.clone()
            logits[:, eos] = float("-inf")
        token = logits.argmax(-1) if how.temperature is None else sample_tokens(logits, how.temperature)
        if greedy_rows is not None and how.temperature is not None:
            token = torch.where(greedy_rows[rows], logits.argmax(-1), token)
        for r, t in zip(rows.tolist(), token.tolist()):
            results[r].append(t)
        if step + 1 == how.max_new_tokens:
            break
        alive = ~torch.isin(token, eos)
        if not alive.all():
            keep = alive.nonzero().squeeze(1)
            if not len(keep):
                break
            cache.batch_select_indices(keep)
            mask, rows, token, next_pos = mask[keep], rows[keep], token[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = lm(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=next_pos.unsqueeze(1),
                 use_cache=True, **{cache_arg: cache})
        cache, logits = returned_cache(out), out.logits[:, -1]
        next_pos = next_pos + 1
    return results


def cache_kwarg(lm) -> str:
    """transformers renamed the forward's `past_key_values` to `cache` (5.2x): the name this version's model takes
    (a PEFT model forwards its keyword arguments to the model it wraps)."""
    model = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward with `use_cache=True` returned (`cache` since transformers 5.2x, else
    `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
