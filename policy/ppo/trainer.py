"""PPO for the personalized policy (seed: P-RLHF with a personalized RM), written as the algorithm reads.

One iteration (`train.max_steps` of them):

1. sample `ppo.rollout_batch_size` (prompt, user) pairs: prompts uniformly from the distinct training prompts,
   users uniformly from the RM's seen users (or, with `ppo.user_sampling=cycle`, in turn; with `group_balanced`,
   the data's user groups in turn, each group's users in turn), and a `ppo.generic_user_share` of the batch as the
   generic user 0;
   a pure function of (seed, iteration), so a resumed run draws exactly what an uninterrupted one would;
2. generate one response per pair with the actor (user prefix, left-padded batch, KV cache, sampling config;
   with `ppo.greedy_in_group` the first sample of each group is the actor's greedy answer);
3. score each response with the frozen RM *for the user it was generated for* (with `ppo.reward_reference`, as
   the RM's probability that the user prefers it to pi_SFT's greedy answer); standardise per user (running
   mean of that user's scores; `ppo.reward_baseline`), clip, subtract `ppo.missing_eos_penalty` where the
   response has no EOS, `ppo.repeated_ngram_penalty` times the share of its n-grams that it repeats and the soft
   overlong ramp on its length (`ppo.overlong_buffer`);
4. reference log-probs (adapters off, no prefix), old log-probs and values (one forward when the critic shares
   the actor's backbone; no values with RLOO);
5. per-token rewards -kl_coef * (log pi - log pi_ref), the score added at the last response token; GAE; whitened
   advantages (or, with `ppo.advantage_estimator=rloo`, the critic-free leave-one-out advantage of each sample's
   KL-penalised sequence reward within its (prompt, user) group);
6. `ppo.ppo_epochs` passes over shuffled minibatches of `ppo.minibatch_size`: clipped policy loss +
   `ppo.vf_coef` * clipped value loss, one optimizer step per minibatch (plain torch or a DeepSpeed engine);
7. update the KL controller, log, write `ppo_history.json`, and every `train.save_every` iterations an atomic,
   resumable checkpoint (parameters, optimizer, KL controller, reward statistics, history).

Launched as N processes (DeepSpeed engine), `ppo.rollout_batch_size` and `ppo.minibatch_size` count the whole
batch: each rank generates, scores and trains on its 1/N share of the pairs (whole groups of
`ppo.samples_per_prompt`), with its own sampling noise; scores are standardised over the whole batch, so the
reward statistics and the KL controller stay the same on every rank. Logged rollout statistics are rank 0's share.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common import checkpoint as ckpt
from common import dist
from common.batching import PairEncoder, collate_sequences, length_sorted_batches
from common.config import Config
from common.tracking import Tracker
from common.optim import clip_grad_norm
from common.trainer import (TrainingError, check_resumable, deepspeed_engine, dump_rank_weights, lr_factor,
                            make_optimizer, run_settings, test_step_delay)
from policy.ppo.core import (
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    PerUserRewardNormalizer,
    leave_one_out_centre,
    preference_reward,
    make_kl_controller,
    masked_mean,
    overlong_penalty,
    per_token_kl_rewards,
    repeated_ngram_share,
    rloo_advantages,
    whiten,
)
from policy.ppo.roles import Actor, Critic, PPOModules, Reference, Reward, user_key
from preference_data.vocab import UserVocab

log = logging.getLogger(__name__)

HISTORY_FILE = "ppo_history.json"

# independent random streams of one iteration
_STREAM_PAIRS, _STREAM_SAMPLING, _STREAM_USER_CYCLE, _STREAM_EPOCH = 1, 2, 3, 8


@dataclass
class Rollout:
    """One rollout batch: B samples, per-token tensors [B, W] over response tokens (CPU)."""

    prompt_index: list[int]
    user_ids: list[str | None]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    text_ids: list[list[int]]
    user_idx: list[int]
    responses: list[str]
    ended: torch.Tensor  # [B] bool: the response ends with EOS
    raw_scores: torch.Tensor  # [B] the RM's r(x, y, u)
    scores: torch.Tensor  # [B] after normalisation, clipping and the missing-EOS and repeated n-gram penalties
    mask: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor = None
    rewards: torch.Tensor = None
    advantages: torch.Tensor = None
    returns: torch.Tensor = None
    timing: dict = field(default_factory=dict)
    repeated: torch.Tensor = None  # [B] share of each response's n-grams that repeat an earlier one
    reference_scores: torch.Tensor = None  # [B] r(x, y_SFT, u) of pi_SFT's greedy answer (ppo.reward_reference)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def batch(self, idx: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
        """Right-padded model inputs [prompt, response] of the samples `idx` (labels on the response)."""
        b = collate_sequences([self.prompt_ids[i] for i in idx], [self.response_ids[i] for i in idx],
                              [self.user_idx[i] for i in idx], [self.text_ids[i] for i in idx], pad_id)
        return {k: v.to(device) for k, v in b.items()}


class PPOTrainer:
    def __init__(self, cfg: Config, run_dir: Path, modules: PPOModules, actor: Actor, critic: Critic,
                 reference: Reference, reward: Reward, tokenizer, vocab: UserVocab, prompts: list[str],
                 user_texts: dict[str, str] | None = None, tracker: Tracker | None = None,
                 user_groups: dict[str, str] | None = None,
                 device: torch.device | None = None):
        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        self.cfg, self.ppo = cfg, cfg.ppo
        self.run_dir = Path(run_dir)
        self.modules, self.actor, self.critic, self.reference, self.reward = modules, actor, critic, reference, reward
        self.tokenizer, self.vocab = tokenizer, vocab
        self.device = device or next(modules.parameters()).device
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.prompts = list(prompts)
        self.users = vocab.ids  # seen users, drawn uniformly
        self.user_texts = dict(user_texts or {})
        self.user_groups = dict(user_groups or {})  # source user id -> group (reports; group_balanced sampling)
        if self.ppo.user_sampling == "group_balanced" and len(self._user_group_members()) < 2:
            log.warning("ppo.user_sampling=group_balanced: the training data names fewer than two user groups "
                        "(its `group` field), so every user is drawn as with cycle")
        self.tracker = tracker
        self.encoder = PairEncoder.from_config(tokenizer, cfg)
        self.prompt_ids = [self.encoder.prompt_ids(p, f"prompt {i + 1}") for i, p in enumerate(self.prompts)]
        self.kl_ctl = make_kl_controller(self.ppo)
        self.reward_stats: dict | None = None  # global baseline: mean/std of the first rollout's raw scores
        self.user_reward_norm = PerUserRewardNormalizer()
        # ppo.reward_reference: pi_SFT's greedy answer per prompt index, and its RM score per (prompt, user key);
        # checkpointed, so that a resumed run scores against exactly the same references
        self.reference_answers: dict[int, list[int]] = {}
        self.reference_rm_scores: dict[tuple[int, str], float] = {}
        self.history: list[dict] = []
        dist.setup(cfg)
        self.minibatch = self._rank_minibatch()
        self.sample_pairs(0)  # a rollout batch that does not split evenly over the ranks fails here, not later
        self.optimizer = make_optimizer(modules.param_groups(cfg), cfg)
        self.engine = None
        if cfg.train.deepspeed:
            self.engine, self.optimizer = deepspeed_engine(modules, self.optimizer, cfg)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.settings = run_settings(cfg)  # what every checkpoint records (hashes the training data once)

    # ------------------------------------------------------------------------------------------ helpers
    def _seed(self, iteration: int, stream: int) -> int:
        return ((self.cfg.seed * 1_000_003 + iteration) * 64 + stream) % (2 ** 62)

    @staticmethod
    def _rank_seed(seed: int) -> int:
        """Rank 0 keeps `seed` (one process samples as it always did); the others shift it so that no two ranks
        draw the same noise and generate the same text."""
        return (seed + dist.rank() * 0x9E3779B97F4A7C15) % (2 ** 62)

    def _rank_minibatch(self) -> int:
        """Samples per rank in one gradient step: `ppo.minibatch_size` is the whole step over all ranks."""
        world = dist.world_size()
        if self.ppo.minibatch_size % world:
            raise ValueError(f"ppo.minibatch_size={self.ppo.minibatch_size} does not split evenly over {world} "
                             "processes (it counts the samples of one gradient step over all of them)")
        return self.ppo.minibatch_size // world

    @property
    def uses_critic(self) -> bool:
        """GAE needs the critic's values; the critic-free RLOO estimator never runs or trains it."""
        return self.ppo.advantage_estimator == "gae"

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage()) if self.engine is not None else 0

    def gathered_parameters(self, module: torch.nn.Module | None = None):
        """Full parameters of `module` (default: all) inside the context; a no-op unless ZeRO-3 partitions them."""
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list((module or self.modules).parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def _ended(self, ids: list[int]) -> bool:
        """Whether a decoded answer finished with EOS (not cut by max_new_tokens)."""
        return len(ids) > 0 and ids[-1] == self.eos_id

    def _text_ids(self, user_id: str | None) -> list[int]:
        return self.encoder.text_ids(self.user_texts.get(user_id)) if user_id is not None else []

    # ------------------------------------------------------------------------------------------ 1. pairs
    def sample_pairs(self, iteration: int, rank: int | None = None,
                     world_size: int | None = None) -> list[tuple[int, str | None]]:
        """(prompt index, source user id or None = generic) for each rollout sample of `iteration`; with
        `ppo.samples_per_prompt` k > 1, each drawn pair appears k times in a row (sample i is in group i // k).
        The batch is drawn whole on every rank; `rank` (default: this process) gets its share of whole groups."""
        k = self.ppo.samples_per_prompt
        B = self.ppo.rollout_batch_size // k
        g = torch.Generator().manual_seed(self._seed(iteration, _STREAM_PAIRS))
        n_generic = B if not self.users else int(round(self.ppo.generic_user_share * B))
        generic = set(torch.randperm(B, generator=g)[:n_generic].tolist())
        prompt_idx = torch.randint(len(self.prompts), (B,), generator=g).tolist()
        if self.ppo.user_sampling in ("cycle", "group_balanced") and self.users:
            user_idx = [0] * B
            personal = [i for i in range(B) if i not in generic]
            walk = self.cycled_users if self.ppo.user_sampling == "cycle" else self.group_balanced_users
            for i, u in zip(personal, walk(iteration * len(personal), len(personal))):
                user_idx[i] = u
        else:
            user_idx = torch.randint(max(len(self.users), 1), (B,), generator=g).tolist()
        pairs = [(p, None if i in generic else self.users[u]) for i, (p, u) in enumerate(zip(prompt_idx, user_idx))]
        return dist.shard([pair for pair in pairs for _ in range(k)], dist.rank() if rank is None else rank,
                          dist.world_size() if world_size is None else world_size, group=k, what="rollout samples")

    def cycled_users(self, start: int, n: int, members: list[int] | None = None, stream: int = 0) -> list[int]:
        """Positions start .. start+n-1 of an endless walk through `members` (default: every seen user, as indices
        into `self.users`), each pass in its own random order (seeded by the pass and `stream`): every member
        appears once per pass, and the walk is a pure function of the seed."""
        members = list(range(len(self.users))) if members is None else members
        orders: dict[int, list[int]] = {}  # one permutation per pass touched, not one per position
        out = []
        for pos in range(start, start + n):
            p, r = divmod(pos, len(members))
            if p not in orders:
                g = torch.Generator().manual_seed((self._seed(p, _STREAM_USER_CYCLE) + stream * 2 ** 40) % 2 ** 62)
                orders[p] = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            out.append(orders[p][r])
        return out

    def group_balanced_users(self, start: int, n: int) -> list[int]:
        """Positions start .. start+n-1 of a walk that gives every user group the same share of the samples
        (the groups take turns, in sorted order), each group walking through its own users as `cycled_users`
        does. With 7 majority and 3 minority users, `cycle` gives the minority 3 samples in 10 and the shared
        LoRA learns mostly the majority's taste; here each group gets 5 (group-robust sampling in the spirit of
        Group Robust Preference Optimization, Ramesh et al. 2024). Users without a group form one group of their own."""
        groups = self._user_group_members()
        names = sorted(groups)
        out = []
        for pos in range(start, start + n):
            turn, g = divmod(pos, len(names))
            out.append(self.cycled_users(turn, 1, groups[names[g]], stream=g + 1)[0])
        return out

    def _user_group_members(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, u in enumerate(self.users):
            groups[self.user_groups.get(u) or ""].append(i)
        return dict(groups)

    # ------------------------------------------------------------------------------------------ 3. scores
    def shape_all_ranks(self, raw: torch.Tensor, users: list[str | None], iteration: int) -> torch.Tensor:
        """`shape_scores` over the whole rollout batch of all ranks, this rank's share returned: the baselines'
        running statistics then see every score, on every rank alike (their checkpoint is rank 0's)."""
        world = dist.world_size()
        if world == 1:
            return self.shape_scores(raw, users)
        all_raw = dist.gather_equal(raw)
        all_users = [u for _, u in self.sample_pairs(iteration, rank=0, world_size=1)]
        scores = self.shape_scores(all_raw, all_users)
        return dist.shard(scores, dist.rank(), world, group=self.ppo.samples_per_prompt, what="rollout scores")

    def shape_scores(self, raw: torch.Tensor, users: list[str | None] | None = None) -> torch.Tensor:
        """Normalise (`ppo.normalize_reward`, `ppo.reward_baseline`) and clip: what needs the whole batch."""
        s = raw.clone().float()
        if self.ppo.normalize_reward and self.ppo.reward_baseline == "group":
            k = self.ppo.samples_per_prompt
            s = self.user_reward_norm.scale(leave_one_out_centre(s, [i // k for i in range(len(s))]),
                                            [user_key(u) for u in (users or [None] * len(s))])
        elif self.ppo.normalize_reward and self.ppo.reward_baseline == "per_user":
            s = self.user_reward_norm(s, [user_key(u) for u in (users or [None] * len(s))])
        elif self.ppo.normalize_reward:
            if self.reward_stats is None:
                std = float(raw.std(unbiased=False)) if raw.numel() > 1 else 0.0
                self.reward_stats = {"mean": float(raw.mean()), "std": std if std > 1e-6 else 1.0}
            s = (s - self.reward_stats["mean"]) / self.reward_stats["std"]
        if self.ppo.reward_clip > 0:
            s = s.clamp(-self.ppo.reward_clip, self.ppo.reward_clip)
        return s

    @torch.no_grad()
    def reference_scores(self, pairs: list[tuple[int, str | None]]) -> torch.Tensor:
        """r(x, y_SFT(x), u) [N] for each (prompt index, user) pair: y_SFT is pi_SFT's greedy answer to the prompt
        (adapters off, the reference prefix: the actor before its first update), decoded the first time the prompt
        is drawn; each (prompt, user) is scored once. Both are kept for the rest of the run."""
        p = self.ppo
        new = sorted({i for i, _ in pairs} - self.reference_answers.keys())
        # entered on every rank, new prompts or not: under ZeRO-3 the gather is a collective
        with self.gathered_parameters(self.actor.backbone):
            if new:
                answers = self.actor.policy.generate(
                    [self.prompt_ids[i] for i in new], torch.zeros(len(new), dtype=torch.long), None,
                    pad_id=self.pad_id, reference=True, do_sample=False, max_new_tokens=p.max_new_tokens,
                    min_new_tokens=p.min_new_tokens, eos_token_id=self.eos_id)
                self.reference_answers.update(zip(new, answers))
        todo = [(i, u) for i, u in dict.fromkeys(pairs) if (i, user_key(u)) not in self.reference_rm_scores]
        if todo:
            answers = [self.reference_answers[i] for i, _ in todo]
            raw = self.reward.score_rollout(
                [self.prompts[i] for i, _ in todo], answers,
                [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers],
                [self._ended(a) for a in answers], [u for _, u in todo], self.tokenizer,
                [self.user_texts.get(u) for _, u in todo] if self.user_texts else None,
                batch_size=p.minibatch_size)
            self.reference_rm_scores.update({(i, user_key(u)): float(r) for (i, u), r in zip(todo, raw)})
        return torch.tensor([self.reference_rm_scores[(i, user_key(u))] for i, u in pairs])

    def penalties(self, ended: torch.Tensor, repeated: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """What each sample pays on its own, after shaping: `ppo.missing_eos_penalty` where it has no EOS,
        `ppo.repeated_ngram_penalty` times the share of its n-grams that it repeats, and the soft overlong ramp
        (`ppo.overlong_buffer`, `ppo.overlong_penalty`) on its length in tokens."""
        p = self.ppo
        out = overlong_penalty(lengths, p.max_new_tokens, p.overlong_buffer, p.overlong_penalty)
        if p.missing_eos_penalty is not None:
            out = out + p.missing_eos_penalty * (~ended).float()
        return out + p.repeated_ngram_penalty * repeated

    # ------------------------------------------------------------------------------------------ 2-5. rollout
    @torch.no_grad()
    def rollout(self, iteration: int) -> Rollout:
        p = self.ppo
        pairs = self.sample_pairs(iteration)
        prompt_ids = [self.prompt_ids[i] for i, _ in pairs]
        user_ids = [u for _, u in pairs]
        user_idx = [self.vocab.index(u) for u in user_ids]
        text_ids = [self._text_ids(u) for u in user_ids]
        self.modules.eval()
        t0 = time.time()

        # 2. generation (sampling noise seeded per iteration, and per rank)
        torch.manual_seed(self._rank_seed(self._seed(iteration, _STREAM_SAMPLING)))
        with self.gathered_parameters(self.actor.backbone):
            # ppo.greedy_in_group: each group's first sample is the actor's greedy answer, in the same batch
            greedy = [i % p.samples_per_prompt == 0 for i in range(len(pairs))] if p.greedy_in_group else None
            responses = self.actor.generate(prompt_ids, torch.tensor(user_idx), text_ids, self.pad_id, self.eos_id,
                                            p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.min_new_tokens,
                                            greedy_rows=greedy)
        t_gen = time.time() - t0
        ended = torch.tensor([self._ended(r) for r in responses])
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]

        # 3. the RM scores each response for the user it was generated for, on the actor's own tokens
        raw = self.reward.score_rollout([self.prompts[i] for i, _ in pairs], responses, texts, ended.tolist(),
                                        user_ids, self.tokenizer,
                                        [self.user_texts.get(u) for u in user_ids] if self.user_texts else None,
                                        batch_size=p.minibatch_size)
        repeated = torch.tensor([repeated_ngram_share(r, p.repeated_ngram_size, self.eos_id) for r in responses])
        ref_scores, graded = None, raw
        if p.reward_reference == "sft_greedy":
            ref_scores = self.reference_scores(pairs)
            graded = preference_reward(raw, ref_scores)
        response_lengths = torch.tensor([len(r) for r in responses])
        scores = self.shape_all_ranks(graded, user_ids, iteration) - self.penalties(ended, repeated, response_lengths)

        # 4. old log-probs, values, reference log-probs
        ro = Rollout([i for i, _ in pairs], user_ids, prompt_ids, responses, text_ids, user_idx, texts, ended,
                     raw, scores, None, None, None, None, repeated=repeated, reference_scores=ref_scores)
        width = max(len(r) for r in responses)
        ro.logps, ro.ref_logps, ro.values, ro.mask = (torch.zeros(len(ro), width) for _ in range(4))
        lengths = [len(q) + len(r) for q, r in zip(prompt_ids, responses)]
        for idx in length_sorted_batches(lengths, p.minibatch_size):  # no gradient: rows of a length together
            batch = ro.batch(idx, self.pad_id, self.device)
            hidden, inputs = self.actor.hidden(batch)
            lp, mask, _ = self.actor.token_logps(hidden, inputs, width)
            if self.uses_critic:
                ro.values[idx] = self.critic.values(batch, width, hidden, inputs).float().cpu()
            ro.logps[idx] = lp.float().cpu()
            ro.mask[idx] = mask.float().cpu()
            ro.ref_logps[idx] = self.reference.token_logps(batch, width).float().cpu()

        # 5. KL-penalised rewards; RLOO: each sample against its siblings, nothing on top; GAE: whitened
        ro.rewards, ro.kl = per_token_kl_rewards(ro.logps, ro.ref_logps, ro.mask, self.kl_ctl.value, scores)
        if p.advantage_estimator == "rloo":
            k = p.samples_per_prompt
            ro.advantages = rloo_advantages(scores, ro.kl, ro.mask, self.kl_ctl.value,
                                            [i // k for i in range(len(ro))])
            ro.returns = ro.values  # zeros: no critic is run or trained
        else:
            ro.advantages, ro.returns = compute_gae(ro.rewards, ro.values, ro.mask, p.gamma, p.lam)
        whiten_advantages = p.whiten_advantages if p.whiten_advantages is not None else p.advantage_estimator == "gae"
        if whiten_advantages:
            ro.advantages = whiten(ro.advantages, ro.mask,
                                   sum_over_ranks=dist.sum_over_ranks if dist.world_size() > 1 else None)
        n_tokens = int(ro.mask.sum())
        ro.timing = {"rollout_s": time.time() - t0, "generate_s": t_gen, "response_tokens": n_tokens}
        return ro

    # ------------------------------------------------------------------------------------------ 6. update
    def _optimizer_step(self, loss: torch.Tensor) -> float | None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else None
        loss.backward()
        norm = None
        if self.cfg.train.max_grad_norm > 0:
            params = [q for g in self.optimizer.param_groups for q in g["params"]]
            norm = clip_grad_norm(params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def update(self, ro: Rollout, iteration: int) -> dict[str, float]:
        p = self.ppo
        # Dropout stays off (eval mode), as in TRL's and OpenRLHF's PPO: the ratio pi / pi_old must compare the
        # function the old log-probs were computed with, or it is not 1 before the first step (model.lora_dropout).
        self.modules.eval()
        sums: dict[str, float] = defaultdict(float)
        n_steps, tokens, t0 = 0, 0, time.time()
        for epoch in range(p.ppo_epochs):
            g = torch.Generator().manual_seed(self._seed(iteration, _STREAM_EPOCH + epoch))
            perm = torch.randperm(len(ro), generator=g).tolist()
            for s in range(0, len(ro), self.minibatch):
                idx = perm[s:s + self.minibatch]
                batch = ro.batch(idx, self.pad_id, self.device)
                mask = ro.mask[idx].to(self.device)
                hidden, inputs = self.actor.hidden(batch)
                logp, _, entropy = self.actor.token_logps(hidden, inputs, ro.width, with_entropy=True)
                pg_loss, clipfrac, approx_kl = clipped_policy_loss(
                    logp, ro.logps[idx].to(self.device), ro.advantages[idx].to(self.device), mask, p.clip_range,
                    p.loss_aggregation)
                if self.uses_critic:
                    values = self.critic.values(batch, ro.width, hidden, inputs)
                    vf_loss, vf_clipfrac = clipped_value_loss(values, ro.values[idx].to(self.device),
                                                              ro.returns[idx].to(self.device), mask, p.clip_range_value)
                    loss = pg_loss + p.vf_coef * vf_loss
                else:
                    vf_loss = vf_clipfrac = torch.zeros((), device=self.device)
                    loss = pg_loss
                if not torch.isfinite(loss):
                    raise TrainingError(f"PPO loss is {loss.item()} at iteration {iteration + 1} (epoch {epoch + 1}); "
                                        "stopping without writing a checkpoint. Lower train.lr or check the RM.")
                norm = self._optimizer_step(loss)
                n_steps += 1
                tokens += int(inputs.attention_mask.sum())
                for k, v in (("loss/policy", pg_loss), ("loss/value", vf_loss), ("loss/total", loss),
                             ("policy/clipfrac", clipfrac), ("policy/approx_kl", approx_kl),
                             ("value/clipfrac", vf_clipfrac), ("policy/entropy", masked_mean(entropy, mask))):
                    sums[k] += float(v.detach())
                if norm is not None:
                    sums["train/grad_norm"] += norm
        out = dist.mean_over_ranks({k: v / max(n_steps, 1) for k, v in sums.items()})
        train_s = time.time() - t0
        out.update({"perf/train_s": train_s, "perf/train_tokens_per_s": tokens / max(train_s, 1e-9),
                    "train/optimizer_steps": n_steps})
        return out

    # ------------------------------------------------------------------------------------------ 7. bookkeeping
    def set_lr(self, iteration: int) -> float:
        tr = self.cfg.train
        f = lr_factor(iteration, tr.warmup_steps, tr.max_steps, tr.lr_scheduler)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    def iteration_metrics(self, ro: Rollout, update: dict, kl_coef: float, lr: float) -> tuple[dict, dict]:
        """(metrics for the tracker, the ppo_history.json entry)."""
        by_user: dict[str, list[int]] = defaultdict(list)
        for i, u in enumerate(ro.user_ids):
            by_user[user_key(u)].append(i)
        words = torch.tensor([len(t.split()) for t in ro.responses], dtype=torch.float)
        seq_kl = ro.kl.sum(1)
        reward_u = {u: float(ro.raw_scores[ix].mean()) for u, ix in sorted(by_user.items())}
        words_u = {u: float(words[ix].mean()) for u, ix in sorted(by_user.items())}
        kl_u = {u: float(seq_kl[ix].mean()) for u, ix in sorted(by_user.items())}
        by_group: dict[str, list[int]] = defaultdict(list)
        for i, u in enumerate(ro.user_ids):
            g = self.user_groups.get(u) if u is not None else None
            if g:
                by_group[g].append(i)
        reward_g = {g: float(ro.raw_scores[ix].mean()) for g, ix in sorted(by_group.items())}
        words_g = {g: float(words[ix].mean()) for g, ix in sorted(by_group.items())}
        kl_g = {g: float(seq_kl[ix].mean()) for g, ix in sorted(by_group.items())}
        repeated_g = ({g: float(ro.repeated[ix].mean()) for g, ix in sorted(by_group.items())}
                      if ro.repeated is not None else {})
        # the RM's probability that the sample beats pi_SFT's answer, whatever the score is made of
        win_g = ({g: float(preference_reward(ro.raw_scores[ix], ro.reference_scores[ix]).mean())
                  for g, ix in sorted(by_group.items())} if ro.reference_scores is not None else {})
        t = ro.timing
        metrics = {
            "reward/mean": float(ro.raw_scores.mean()), "score/mean": float(ro.scores.mean()),
            **{f"reward/user/{u}": v for u, v in reward_u.items()},
            **{f"reward/group/{g}": v for g, v in reward_g.items()},
            **{f"length/words/group/{g}": v for g, v in words_g.items()},
            **{f"kl/seq/group/{g}": v for g, v in kl_g.items()},
            **{f"kl/seq/user/{u}": v for u, v in kl_u.items()},
            **{f"rollout/repeated_ngram_share/group/{g}": v for g, v in repeated_g.items()},
            **{f"reward/p_beats_sft/group/{g}": v for g, v in win_g.items()},
            "kl/seq": float(seq_kl.mean()), "kl/token": float(masked_mean(ro.kl, ro.mask)), "kl/coef": kl_coef,
            "value/mean": float(masked_mean(ro.values, ro.mask)),
            "returns/mean": float(masked_mean(ro.returns, ro.mask)),
            "length/words": float(words.mean()), **{f"length/words/{u}": v for u, v in words_u.items()},
            "length/tokens": float(ro.mask.sum(1).mean()), "rollout/eos_rate": float(ro.ended.float().mean()),
            "perf/rollout_s": t["rollout_s"], "perf/generate_s": t["generate_s"],
            "perf/rollout_tokens_per_s": t["response_tokens"] / max(t["rollout_s"], 1e-9),
            "perf/generate_tokens_per_s": t["response_tokens"] / max(t["generate_s"], 1e-9),
            "train/lr": lr, **update,
        }
        entry = {"reward": reward_u, "response_words": words_u, "reward_group": reward_g,
                 "response_words_group": words_g, "kl_group": kl_g, "kl_user": kl_u,
                 "repeated_ngram_share_group": repeated_g, **({"p_beats_sft_group": win_g} if win_g else {}),
                 "n": {u: len(ix) for u, ix in sorted(by_user.items())},
                 "reward_mean": metrics["reward/mean"], "kl": metrics["kl/seq"], "kl_coef": kl_coef,
                 "loss": update.get("loss/total"), "value_loss": update.get("loss/value"),
                 "entropy": update.get("policy/entropy"), "eos_rate": metrics["rollout/eos_rate"],
                 "example": {"user": user_key(ro.user_ids[0]), "prompt": self.prompts[ro.prompt_index[0]],
                             "response": ro.responses[0]}}
        return metrics, entry

    def write_history(self) -> Path:
        path = self.run_dir / HISTORY_FILE
        if not dist.is_main():
            return path
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"users": [user_key(None)] + self.users, "iterations": self.history}, indent=1))
        os.replace(tmp, path)
        return path

    def save(self, done: int) -> Path:
        extra = {"iteration": done, "kl_controller": self.kl_ctl.state_dict(), "reward_stats": self.reward_stats,
                 "user_reward_norm": self.user_reward_norm.state_dict(),
                 "reference_answers": {str(i): a for i, a in self.reference_answers.items()},
                 "reference_rm_scores": [[i, u, v] for (i, u), v in self.reference_rm_scores.items()],
                 "history": self.history, "settings": self.settings}
        return ckpt.save_checkpoint(self.ckpt_root, done, self.modules, self.optimizer, extra=extra,
                                    keep_last=self.cfg.train.keep_last, engine=self.engine)

    def maybe_resume(self) -> int:
        if self.cfg.train.resume != "auto" or (latest := ckpt.latest_checkpoint(self.ckpt_root)) is None:
            return 0
        check_resumable(latest, self.settings, self.cfg.train.max_steps)
        state, _ = ckpt.load_checkpoint(latest, self.modules, self.optimizer, self.engine)
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_stats = state.get("reward_stats")
        if state.get("user_reward_norm"):
            self.user_reward_norm.load_state_dict(state["user_reward_norm"])
        self.reference_answers = {int(i): a for i, a in (state.get("reference_answers") or {}).items()}
        self.reference_rm_scores = {(int(i), u): v for i, u, v in state.get("reference_rm_scores") or []}
        self.history = state.get("history", [])
        log.info("resumed PPO from %s (iteration %d)", latest, state["iteration"])
        return int(state["iteration"])

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> dict:
        tr = self.cfg.train
        start = self.maybe_resume()
        bar = tqdm(range(start, tr.max_steps), desc="ppo", initial=start, total=tr.max_steps, dynamic_ncols=True,
                   disable=not dist.is_main())
        t_start, last = time.time(), {}
        for it in bar:
            test_step_delay()
            lr = self.set_lr(it)
            ro = self.rollout(it)
            stats = self.update(ro, it)
            kl_coef = self.kl_ctl.value  # the coefficient this iteration's rewards used
            seq_kl = dist.mean_over_ranks({"kl": float(ro.kl.sum(1).mean())})["kl"]  # the whole batch's
            self.kl_ctl.update(seq_kl, n_steps=len(ro) * dist.world_size())
            done = it + 1
            last, entry = self.iteration_metrics(ro, stats, kl_coef, lr)
            self.history.append({"iteration": done, **entry})
            if self.tracker is not None:
                self.tracker.log(last, step=done)
            self.write_history()
            bar.set_postfix(reward=f"{last['reward/mean']:.3f}", kl=f"{last['kl/seq']:.3f}",
                            words=f"{last['length/words']:.1f}")
            if tr.save_every and done % tr.save_every == 0 and done < tr.max_steps:
                self.save(done)
        bar.close()
        self.modules.eval()
        dump_rank_weights(self.modules)
        if self.history:
            self.write_history()
        return {"iterations": tr.max_steps, "resumed_from": start, "wall_s": time.time() - t_start,
                "last": last, "kl_coef": self.kl_ctl.value, "reward_stats": self.reward_stats}
