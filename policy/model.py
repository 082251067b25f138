"""The personalized policy: sequence log-probs under [user prefix, prompt, response] and batched generation."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from common.backbone import PersonalizedBackbone
from common.batching import pad
from policy.decoding import decode, plain_decoding
from user_models import prepend_prefix


def response_logps(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
                   return_per_token: bool = False):
    """Sum over response tokens of log p(token). The LM head runs only on positions that predict a label: with a
    49k vocabulary it is most of the cost, and prompt positions do not need it."""
    target = labels[:, 1:]
    is_label = target != -100
    rows, cols = is_label.nonzero(as_tuple=True)
    h = hidden[:, :-1][rows, cols]
    weight = getattr(lm_head, "weight", None)
    logits = lm_head(h.to(weight.dtype) if weight is not None else h).float()
    token_logp = torch.log_softmax(logits, -1).gather(-1, target[rows, cols].unsqueeze(-1)).squeeze(-1)
    per_seq = torch.zeros(labels.shape[0], dtype=token_logp.dtype, device=hidden.device)
    per_seq = per_seq.index_add(0, rows, token_logp)
    if return_per_token:
        dense = torch.zeros(target.shape, dtype=token_logp.dtype, device=hidden.device)
        dense[rows, cols] = token_logp
        return per_seq, dense, logits, (rows, cols)
    return per_seq


class PersonalizedPolicy(nn.Module):
    def __init__(self, backbone: PersonalizedBackbone):
        super().__init__()
        self.backbone = backbone

    @property
    def user_model(self):
        return self.backbone.user_model

    def sequence_logps(self, batch: dict) -> torch.Tensor:
        """log pi_P(y | x, u) for every row, with that row's user."""
        hidden, inputs = self.backbone.hidden_states(batch)
        return response_logps(hidden, inputs.labels, self.backbone.lm_head)

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        """log pi_SFT(y | x): adapters off and the reference prefix, whatever the row's user."""
        with self.backbone.reference() as ref_lm:
            hidden, inputs = self.backbone.hidden_states(batch, lm=ref_lm, reference=True)
            return response_logps(hidden, inputs.labels, ref_lm.lm_head)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], user_idx: torch.Tensor, texts: list[list[int]] | None = None,
                 pad_id: int = 0, use_prefix: bool = True, reference: bool = False,
                 greedy_rows: list[bool] | None = None, **gen_kwargs) -> list[list[int]]:
        """Batched generation with the KV cache; left-padded rows laid out [pads, prefix, prompt].

        Returns the new tokens of each row, cut after its first EOS. `reference=True` decodes pi_SFT (adapters off,
        the reference prefix); `use_prefix=False` decodes without any prefix. `gen_kwargs` are `generate`'s; greedy
        decoding and sampling from the full softmax(logits / T) run in `policy.decoding.decode` (finished rows
        leave the batch), anything else (top-k, top-p, ...) in transformers' `generate`. `greedy_rows`: rows
        decoded greedily in a sampling batch (the plain decoder only).
        """
        device = next(self.backbone.lm.parameters()).device
        input_ids = pad(prompts, pad_id, side="left").to(device)
        mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
        texts = texts or [[] for _ in prompts]
        text_ids = pad(texts, pad_id).to(device)
        text_mask = pad([[1] * len(t) for t in texts], 0).to(device)
        ctx = self.backbone.reference() if reference else contextlib.nullcontext(self.backbone.base_lm)
        with ctx as lm, self.backbone.autocast():
            embed = lm.get_input_embeddings()
            token_embeds = embed(input_ids)
            ref_prefix = self.backbone.reference_prefix if reference else None
            if ref_prefix is not None:
                prefix = ref_prefix.unsqueeze(0).expand(len(prompts), -1, -1)
                inputs = prepend_prefix(prefix, torch.ones(prefix.shape[:2], dtype=torch.long, device=device),
                                        token_embeds, mask, padding_side="left")
                embeds, attn = inputs.inputs_embeds, inputs.attention_mask
            elif use_prefix and not reference:
                prefix = self.backbone.user_model(user_idx.to(device), text_ids, text_mask, embed_tokens=embed)
                inputs = prepend_prefix(prefix.embeds, prefix.mask, token_embeds, mask, padding_side="left")
                embeds, attn = inputs.inputs_embeds, inputs.attention_mask
            else:
                embeds, attn = token_embeds, mask
            how = plain_decoding(gen_kwargs, lm.generation_config.eos_token_id)
            if how is not None:
                greedy = None if greedy_rows is None else torch.tensor(greedy_rows, dtype=torch.bool, device=device)
                return decode(lm, embeds, attn, how, greedy_rows=greedy)
            if greedy_rows is not None and any(greedy_rows):
                raise ValueError("greedy_rows needs the plain decoder: no top-k, top-p or other generate options")
            out = lm.generate(inputs_embeds=embeds, attention_mask=attn, pad_token_id=pad_id, **gen_kwargs)
        eos = gen_kwargs.get("eos_token_id", lm.generation_config.eos_token_id)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        results = []
        for row in out.tolist():
            cut = []
            for t in row:
                cut.append(t)
                if t in eos_ids:
                    break
            results.append(cut)
        return results
