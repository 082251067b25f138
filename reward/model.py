"""r(x, y, u): decoder with LoRA + user soft prompt + a scalar head, read at the last real token, summed over the
answer's tokens, or both (`model.reward_pooling`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from common.backbone import PersonalizedBackbone

POOLINGS = ("last", "sum", "last_sum", "sum_validity")
HEAD_NAME = "score"  # the head's file in a train_rm run: checkpoint/score_head.safetensors
# `sum` divides by a fixed token count: Adam moves every weight by about lr per step, and a head read at every token
# of a 60-token answer would move the reward 60x as far as one read once (measured: held-out margins ~50 and a BT
# loss swinging 0.2-60 with the demo's lr). 1/64 keeps a 64-token answer's reward on the scale of `last`'s while the
# reward stays additive: an answer twice as long adds twice as much.
SUM_POOLING_TOKENS = 64
# `last_sum` = a judgement of the whole answer at its last token + a grade that adds up token by token. `sum` alone
# cannot penalise a broken answer much: one position of an empty answer, or a token of a run, moves the reward by
# 1/64 of its head value, so for a user who prefers short answers the empty answer (a sum of nothing) beat every
# real short one (docs/results.md). The last-token term can give a broken answer a large penalty at one position,
# the summed term keeps grading length past the training answers. Two head outputs: 0 read at the last token, 1 at
# every answer token.
# `sum_validity` bounds the last-token term: log sigmoid(v_last) <= 0, a penalty that a real answer can drive to 0 but
# not above. With `last_sum` the last-token term learned the training answers' length (the majority's reward peaked at
# 35-49 words and fell past them) and PPO's majority stayed at pi_SFT's length: a term that can only subtract cannot
# make a 40-word answer better than a 70-word one, it can only mark an answer as broken.


class PersonalizedRewardModel(nn.Module):
    def __init__(self, backbone: PersonalizedBackbone, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"reward pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        two_outputs = pooling in ("last_sum", "sum_validity")  # 0: read at the last token, 1: at every answer token
        self.score = nn.Linear(backbone.hidden_size, 2 if two_outputs else 1, bias=True)
        with torch.no_grad():  # float32 whatever the LLM's dtype: it is trained (common.precision)
            self.score.weight.normal_(0.0, 1.0 / (backbone.hidden_size + 1) ** 0.5)
            self.score.bias.zero_()

    @property
    def user_model(self):
        return self.backbone.user_model

    def forward(self, batch: dict) -> torch.Tensor:
        """Rewards [N] for the N rows of a right-padded batch, each for its own `user_idx`."""
        hidden, inputs = self.backbone.hidden_states(batch)
        dtype = self.score.weight.dtype  # the head's float32, whatever the LLM's: cast only what the head reads
        if self.pooling == "sum":
            # w . h_t over the answer's positions (labels, EOS included) / SUM_POOLING_TOKENS, bias once: the reward of
            # an answer is the sum of what each of its tokens adds, so one more sentence adds as much at 150 words as
            # at 50.
            per_token = hidden.to(dtype) @ self.score.weight.squeeze(0)
            return (self._answer_sum(per_token, inputs.labels) + self.score.bias).float()
        # Pool the last *real* position: with right padding the last position is a pad (stack notes).
        last = inputs.attention_mask.long().sum(1) - 1
        at_last = self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(dtype))
        if self.pooling == "last":
            return at_last.squeeze(-1).float()
        per_token = hidden.to(dtype) @ self.score.weight[1] + self.score.bias[1]
        judged = at_last[:, 0] if self.pooling == "last_sum" else nn.functional.logsigmoid(at_last[:, 0])
        return (judged + self._answer_sum(per_token, inputs.labels)).float()

    def _answer_sum(self, per_token: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError(f"reward pooling {self.pooling!r} needs the batch's labels (the answer's tokens, -100 "
                             "elsewhere)")
        return (per_token * (labels != -100).to(per_token.dtype)).sum(1) / SUM_POOLING_TOKENS


def load_reward_model(run_dir, cfg, backbone: PersonalizedBackbone) -> PersonalizedRewardModel:
    """A finished train_rm run's reward model on `backbone` (built from that run): its pooling and its trained head."""
    from common.run import load_head

    rm = PersonalizedRewardModel(backbone, cfg.model.reward_pooling)
    load_head(run_dir, HEAD_NAME, rm.score)
    return rm


def rm_run_problem(run_dir) -> str | None:
    """Why `run_dir` is not the folder of a finished train_rm run ("no such folder", the files it lacks, a run.json
    of another route), or None. Reads no model: callers check before they load anything and word the error for the
    key or flag that named the folder."""
    from common.run import RUN_INFO, run_route

    run = Path(run_dir)
    if not run.is_dir():
        return "no such folder"
    missing = [p for p in ("config.yaml", "users.json", RUN_INFO, "checkpoint/user_model.json",
                           f"checkpoint/{HEAD_NAME}_head.safetensors") if not (run / p).exists()]
    if missing:
        return f"not a finished train_rm run (missing {', '.join(missing)})"
    try:
        route = run_route(json.loads((run / RUN_INFO).read_text()))
    except (OSError, ValueError) as exc:
        return f"unreadable {RUN_INFO} ({exc})"
    return None if route == "rm" else f"a '{route}' run, not a finished train_rm run"
