"""Greedy generation per user on held-out prompts: the seed's Figure 3 (response length per user)."""

from __future__ import annotations

import torch

from common.metrics import words


@torch.no_grad()
def generate_per_user(policy, encoder, prompts: list[str], users: dict[str, int], max_new_tokens: int,
                      pad_id: int, batch_size: int = 16, include_reference: bool = True,
                      sample_outputs: int = 2) -> dict:
    """For every user (label -> index; index 0 is the generic user) and the reference policy: mean words of the
    greedy responses, and a few example responses."""
    tok = encoder.tok
    prompt_ids = [encoder.prompt_ids(p) for p in prompts]
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
    result: dict = {"users": {}, "examples": {}, "texts": {}}
    targets = [(label, idx, False) for label, idx in users.items()]
    if include_reference:
        targets.append(("<reference>", 0, True))
    for label, idx, is_ref in targets:
        texts = []
        for i in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[i:i + batch_size]
            user_idx = torch.full((len(chunk),), idx, dtype=torch.long)
            out = policy.generate(chunk, user_idx, pad_id=pad_id, reference=is_ref, **gen)
            texts += [tok.decode(o, skip_special_tokens=True).strip() for o in out]
        mean_words = sum(words(t) for t in texts) / max(len(texts), 1)
        result["users"][label] = mean_words
        rows = [{"prompt": p, "response": t} for p, t in zip(prompts, texts)]
        result["texts"][label] = rows
        result["examples"][label] = rows[:sample_outputs]
    return result
