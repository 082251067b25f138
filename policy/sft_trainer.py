"""Supervised fine-tuning on the preferred responses: the pi_SFT that PPO explores from and that DPO and PPO
measure their KL against. It is user-agnostic, as the reference of the seed's P-DPO loss is: every example is the
generic user 0, so the only soft prompt it trains is the generic one. Later stages keep that prompt as the
reference's prefix and start their own generic embedding e_0 there, so that they start exactly at pi_SFT."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.batching import EncodedPair, collate_sequences
from common.config import Config
from common.trainer import TrainLoop, batch_indices, param_groups
from policy.model import PersonalizedPolicy, response_logps


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: list[int]
    response_ids: list[int]


def sft_examples(pairs: list[EncodedPair], responses: str = "chosen") -> list[SFTExample]:
    """One example per record and imitated response. Records are not de-duplicated: a response preferred by many
    annotators weighs more, so pi_SFT keeps the data's mix of tastes (which is what PPO needs to explore)."""
    out = [SFTExample(p.prompt_ids, p.chosen_ids) for p in pairs]
    if responses == "both":
        out += [SFTExample(p.prompt_ids, p.rejected_ids) for p in pairs]
    return out


def collate_sft(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [prompt, response] rows, all for the generic user 0."""
    return collate_sequences([e.prompt_ids for e in examples], [e.response_ids for e in examples],
                             [0] * len(examples), [[] for _ in examples], pad_id)


def sft_loss(policy: PersonalizedPolicy, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood per response token of pi(y | x) (the generic user's soft prompt in front), and
    the token count."""
    hidden, inputs = policy.backbone.hidden_states(batch)
    logps = response_logps(hidden, inputs.labels, policy.backbone.lm_head)
    n_tokens = int((inputs.labels[:, 1:] != -100).sum())
    return -logps.sum() / max(n_tokens, 1), n_tokens


class SFTTrainer:
    def __init__(self, cfg: Config, policy: PersonalizedPolicy, examples: list[SFTExample], pad_id: int, device,
                 run_dir: Path, tracker=None, eval_fn=None):
        if not examples:
            raise ValueError("train_sft: no examples to imitate")
        self.cfg, self.policy, self.examples, self.pad_id, self.device = cfg, policy, examples, pad_id, device
        self.loop = TrainLoop(cfg, run_dir, policy, param_groups(policy.backbone, cfg, []), self.loss,
                              eval_fn=eval_fn, tracker=tracker, desc="train_sft")

    def loss(self, step: int, micro: int):
        tr = self.cfg.train
        idx = batch_indices(len(self.examples), tr.batch_size, self.cfg.seed, step, micro, tr.grad_accum)
        batch = collate_sft([self.examples[i] for i in idx], self.pad_id)
        loss, n_tokens = sft_loss(self.policy, {k: v.to(self.device) for k, v in batch.items()})
        return loss, {"nll": loss.item(), "tokens": int(batch["attention_mask"].sum()), "response_tokens": n_tokens}

    def train(self) -> dict:
        return self.loop.run()
