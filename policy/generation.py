"""Greedy generation per user on held-out prompts: the seed's Figure 3 (response length per user)."""

from __future__ import annotations

import torch

from common.metrics import distinct_token_share, words


@torch.no_grad()
def generate_per_user(policy, encoder, prompts: list[str], users: dict[str, int], max_new_tokens: int,
                      pad_id: int, batch_size: int = 16, include_reference: bool = True,
                      sample_outputs: int = 2, min_new_tokens: int = 0) -> dict:
    """For every user (label -> index; index 0 is the generic user) and the reference policy: mean words of the
    greedy responses (`users`), mean tokens (`response_tokens`, EOS included), mean share of distinct tokens per
    response (`distinct_token_share`), every response (`texts`) and a few examples.

    `min_new_tokens` > 0 rules EOS out for the first tokens, as for a PPO policy whose rollouts were sampled that
    way: its log-probs were trained on that constrained distribution, so it is the policy to decode."""
    tok = encoder.tok
    prompt_ids = [encoder.prompt_ids(p) for p in prompts]
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
               eos_token_id=tok.eos_token_id)
    # every (user, prompt) row in as few batched calls as possible: the user index is a per-row tensor, so users
    # share a batch (one decoding pass over the weights serves batch_size rows instead of len(prompts))
    # a uniform user model gives every user the same prefix (no user text is passed here), so one user's answers
    # are every user's: decode them once (vanilla DPO's evaluation decodes 1 user instead of 11)
    uniform = getattr(getattr(policy, "user_model", None), "kind", None) == "uniform"
    decoded = dict(list(users.items())[:1]) if uniform else users
    rows = [(label, idx, j) for label, idx in decoded.items() for j in range(len(prompt_ids))]
    texts: dict[str, list[str]] = {label: [""] * len(prompt_ids) for label in users}
    ids: dict[str, list[list[int]]] = {label: [[]] * len(prompt_ids) for label in users}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        out = policy.generate([prompt_ids[j] for _, _, j in chunk], torch.tensor([idx for _, idx, _ in chunk]),
                              pad_id=pad_id, **gen)
        for (label, _, j), o in zip(chunk, out):
            texts[label][j] = tok.decode(o, skip_special_tokens=True).strip()
            ids[label][j] = o
    first = next(iter(decoded), None)
    for label in users.keys() - decoded.keys():
        texts[label], ids[label] = list(texts[first]), list(ids[first])
    if include_reference:
        texts["<reference>"], ids["<reference>"] = [], []
        for i in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[i:i + batch_size]
            out = policy.generate(chunk, torch.zeros(len(chunk), dtype=torch.long), pad_id=pad_id, reference=True,
                                  **gen)
            texts["<reference>"] += [tok.decode(o, skip_special_tokens=True).strip() for o in out]
            ids["<reference>"] += out
    result: dict = {"users": {}, "examples": {}, "texts": {}, "response_tokens": {}, "distinct_token_share": {}}
    for label, outs in texts.items():
        n = max(len(outs), 1)
        result["users"][label] = sum(words(t) for t in outs) / n
        # words can be fooled (a run of "BBBB..." is one word): tokens and the share of distinct tokens per
        # response (distinct-1) show whether a short answer is an answer or a degenerate string
        result["response_tokens"][label] = sum(len(o) for o in ids[label]) / n
        result["distinct_token_share"][label] = sum(distinct_token_share(o) for o in ids[label]) / n
        pairs = [{"prompt": p, "response": t} for p, t in zip(prompts, outs)]
        result["texts"][label] = pairs
        result["examples"][label] = pairs[:sample_outputs]
    return result
