"""`ppo_rollout`: rollout throughput of batched generation vs a per-example loop, and one PPO iteration's phases.

- naive: `PersonalizedPolicy.generate` called once per prompt (batch 1), one after the other;
- batched: one `PersonalizedPolicy.generate` call for all prompts (left-padded [pads, prefix, prompt], KV cache).

Both see the same prompts (synthetic token ids of --prompt-len) and users, greedy decoding (or fixed-seed sampling
with --sample) and exactly --max-new-tokens new tokens per row (EOS suppressed with min_new_tokens, so both do the
same work). `match_naive` is the share of rows whose batched output equals the per-example output (greedy: 1.0
expected in float32).

With `policy.ppo` importable, `ppo_iteration` times one full PPO iteration of `policy.ppo.trainer.PPOTrainer` on the
same model (actor with a shared critic, a freshly initialised personalized RM as the frozen reward model, batch
--batch, ppo.minibatch_size = min(8, batch), ppo.ppo_epochs from the config): generate / RM score / reference
log-probs / actor log-probs + values / PPO update, each timed by wrapping that role's method.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from bench.common import BenchArgs, bench_config, free_memory, now, run_tmpdir, synthetic_pairs, token_pool


def _policy(a: BenchArgs, cfg):
    from common.run import build_backbone, pick_device, seed_everything
    from policy.model import PersonalizedPolicy

    seed_everything(cfg.seed)
    device = pick_device(cfg)
    backbone, tok = build_backbone(cfg, a.n_users, device)
    return PersonalizedPolicy(backbone).to(device).eval(), tok, device


def generation_rows(a: BenchArgs) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with run_tmpdir("rollout") as tmp:
        cfg = bench_config(a, tmp, {"user_model.kind": "individual"})
        policy, tok, device = _policy(a, cfg)
        pairs = synthetic_pairs(tok, a.batch, a.prompt_len, 1, a.n_users, a.seed)
        prompts = [p.prompt_ids for p in pairs]
        users = torch.tensor([p.user_idx for p in pairs])
        gen = dict(max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens, eos_token_id=tok.eos_token_id,
                   do_sample=a.sample, use_cache=True)
        if a.sample:
            gen.update(temperature=1.0, top_k=0, top_p=1.0)
        pad = tok.pad_token_id

        def run(batch_prompts, batch_users):
            torch.manual_seed(a.seed)
            return policy.generate(batch_prompts, batch_users, pad_id=pad, **gen)

        # warm-up: one short call of each shape
        warm = dict(gen, max_new_tokens=2, min_new_tokens=2)
        policy.generate(prompts[:1], users[:1], pad_id=pad, **warm)
        policy.generate(prompts, users, pad_id=pad, **warm)

        results = {}
        if a.want("naive"):
            t0 = now(device)
            naive = [run([p], users[i:i + 1])[0] for i, p in enumerate(prompts)]
            secs = now(device) - t0
            results["naive"] = naive
            n = sum(len(o) for o in naive)
            rows.append({"impl": "naive", "tokens_per_s": n / secs, "seconds": secs, "tokens": n, "batch": 1,
                         "prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "prompt_len": a.prompt_len})
        if a.want("batched"):
            t0 = now(device)
            batched = run(prompts, users)
            secs = now(device) - t0
            n = sum(len(o) for o in batched)
            row = {"impl": "batched", "tokens_per_s": n / secs, "seconds": secs, "tokens": n, "batch": len(prompts),
                   "prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "prompt_len": a.prompt_len}
            if "naive" in results:
                row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
                row["match_naive"] = sum(x == y for x, y in zip(batched, results["naive"])) / len(prompts)
            rows.append(row)
        del policy
        free_memory(device)
    return rows


# --------------------------------------------------------------------------------------------- PPO iteration


def _timed(fn, bucket: dict[str, float], key: str, device):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = now(device)
        out = fn(*args, **kwargs)
        bucket[key] = bucket.get(key, 0.0) + now(device) - t0
        return out

    return wrapper


def _prompt_texts(tok, n: int, length: int, seed: int) -> list[str]:
    """Prompt strings of about `length` tokens (PPO reads prompt text and applies the chat template itself)."""
    g = torch.Generator().manual_seed(seed)
    pool = token_pool(tok)
    texts = []
    for _ in range(n):
        ids = pool[torch.randint(len(pool), (length,), generator=g)].tolist()
        texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts


def ppo_iteration_row(a: BenchArgs) -> dict[str, Any] | None:
    try:
        from policy.ppo.roles import Reward, build_roles
        from policy.ppo.trainer import PPOTrainer
    except ImportError as exc:  # the PPO stage is optional for this benchmark
        return {"impl": "ppo_iteration", "skipped": f"policy.ppo not importable: {exc}"}
    from common.run import build_backbone, seed_everything
    from preference_data.vocab import UserVocab
    from reward.model import PersonalizedRewardModel

    mb = min(8, a.batch)
    while a.batch % mb:
        mb -= 1
    with run_tmpdir("ppo") as tmp:
        cfg = bench_config(a, tmp, {"user_model.kind": "individual", "ppo.rollout_batch_size": a.batch,
                                    "ppo.minibatch_size": mb, "ppo.max_new_tokens": a.max_new_tokens,
                                    "train.max_steps": a.warmup + a.steps})
        device = torch.device(a.device)
        seed_everything(cfg.seed)
        vocab = UserVocab([f"user_{i}" for i in range(1, a.n_users + 1)])
        modules, actor, critic, reference, tok = build_roles(cfg, len(vocab), device)
        rm_backbone, rm_tok = build_backbone(cfg, len(vocab), device)
        reward = Reward(PersonalizedRewardModel(rm_backbone).to(device), rm_tok, vocab, cfg)
        prompts = _prompt_texts(tok, max(a.batch, 4), a.prompt_len, a.seed)
        trainer = PPOTrainer(cfg, tmp, modules, actor, critic, reference, reward, tok, vocab, prompts,
                             device=device)
        phases: dict[str, float] = {}
        trainer.actor.generate = _timed(trainer.actor.generate, phases, "generate_s", device)
        trainer.reward.score_ids = _timed(trainer.reward.score_ids, phases, "score_s", device)
        trainer.reference.token_logps = _timed(trainer.reference.token_logps, phases, "reference_s", device)
        samples = []
        for it in range(a.warmup + a.steps):
            phases.clear()
            trainer.set_lr(it)
            t0 = now(device)
            ro = trainer.rollout(it)
            t_rollout = now(device) - t0
            t1 = now(device)
            trainer.update(ro, it)
            t_train = now(device) - t1
            trainer.kl_ctl.update(float(ro.kl.sum(1).mean()), n_steps=len(ro))
            other = t_rollout - sum(phases.values())
            samples.append({**phases, "policy_value_s": other, "train_s": t_train, "iteration_s": t_rollout + t_train,
                            "response_tokens": int(ro.mask.sum())})
        timed = samples[a.warmup:] or samples
        keys = ["generate_s", "score_s", "reference_s", "policy_value_s", "train_s", "iteration_s"]
        row: dict[str, Any] = {"impl": "ppo_iteration"}
        for k in keys:
            vals = sorted(s.get(k, 0.0) for s in timed)
            row[k] = vals[len(vals) // 2]
        for k in keys[:-1]:
            row[k.replace("_s", "_share")] = row[k] / row["iteration_s"] if row["iteration_s"] else None
        row.update({"response_tokens": timed[-1]["response_tokens"], "batch": a.batch, "minibatch": mb,
                    "ppo_epochs": cfg.ppo.ppo_epochs, "critic": cfg.ppo.critic, "n_timed": len(timed),
                    "tokens_per_s": timed[-1]["response_tokens"] / row["generate_s"] if row["generate_s"] else None,
                    "note": "policy_value_s = rollout minus generate/score/reference: actor log-probs, values, GAE"})
        del trainer, modules, actor, critic, reference, reward, rm_backbone
        free_memory(device)
    return row


def run_ppo_rollout(a: BenchArgs) -> list[dict]:
    """Every row in each of `a.dtypes` (or `a.dtype`), tagged with its dtype."""
    from dataclasses import replace

    a.batch = a.batch or 16
    rows = []
    for dtype in a.dtypes or [a.dtype]:
        ad = replace(a, dtype=dtype)
        part = generation_rows(ad)
        if ad.ppo_iteration and ad.want("ppo_iteration"):
            row = ppo_iteration_row(ad)
            if row is not None:
                part.append(row)
        rows += [{**r, "dtype": dtype} for r in part]
    return rows
