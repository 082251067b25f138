"""A finished policy run (SFT, P-DPO / vanilla DPO, PPO) loaded for answering prompts as given users.

What `winrate`, `generate` and `serve` share: one way to load a run's LoRA adapter and user table, to map a source
user id to its row (unseen -> the generic user 0), and to decode a batch in which every row has its own user.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.batching import PairEncoder
from common.config import Config
from common.run import load_backbone_from_run, pick_device
from policy.model import PersonalizedPolicy
from preference_data.vocab import UserVocab

POLICY_ROUTES = ("sft", "dpo", "ppo")


@dataclass
class Generated:
    text: str
    token_ids: list[int]  # the new tokens, EOS included when the answer ended
    finished: bool  # ended with EOS (False: cut by max_new_tokens)


@dataclass
class PolicyRun:
    run_dir: Path
    cfg: Config
    info: dict
    route: str  # "sft" | "dpo" | "ppo"
    policy: PersonalizedPolicy
    tokenizer: object
    encoder: PairEncoder
    vocab: UserVocab
    device: torch.device

    @property
    def uses_prefix(self) -> bool:
        """pi_SFT is user-agnostic: it is decoded with its generic soft prompt, or none when it was trained without
        one (an SFT run from before train_sft trained a prompt)."""
        return self.route != "sft" or bool(self.info.get("reference_prefix"))

    @property
    def personalized(self) -> bool:
        """Whether the user changes the answer (a uniform user model or an SFT run answers alike for everyone)."""
        return self.uses_prefix and self.policy.user_model.kind != "uniform"

    @property
    def min_new_tokens(self) -> int:
        """A PPO policy is decoded under the EOS rule its rollouts were sampled (and its log-probs trained) with."""
        return int(self.cfg.ppo.min_new_tokens) if self.route == "ppo" else 0

    def knows(self, user_id: str | None) -> bool:
        return user_id is not None and user_id in self.vocab

    def user_index(self, user_id: str | None) -> int:
        """The row of a source user id; unseen or None -> the generic user 0."""
        return self.vocab.index(user_id) if self.knows(user_id) else 0


def policy_route(info: dict) -> str:
    from common.run import STAGE_ROUTES, run_route

    route = run_route(info) if info.get("stage") in STAGE_ROUTES or info.get("route") else None
    if route not in POLICY_ROUTES:
        raise ValueError(f"stage {info.get('stage')!r} is not a policy run (expected one of train_sft, train_pdpo, "
                         "train_ppo); a reward-model run scores answers, it does not write them")
    return route


def load_policy_run(run_dir: str | Path, device: torch.device | str | None = None,
                    cfg: Config | None = None) -> PolicyRun:
    """Load a finished policy run. A reward-model run is refused with a ValueError naming the folder."""
    import json

    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a finished run (no run.json)")
    try:
        route = policy_route(json.loads(info_path.read_text()))
    except ValueError as exc:
        raise ValueError(f"{run_dir}: {exc}") from None
    if device is None:
        from common.run import load_run_config

        device = pick_device(cfg or load_run_config(run_dir))
    device = torch.device(device)
    cfg, backbone, tokenizer, vocab, info = load_backbone_from_run(run_dir, device, cfg)
    policy = PersonalizedPolicy(backbone).to(device).eval()
    encoder = PairEncoder.from_config(tokenizer, cfg)
    return PolicyRun(run_dir, cfg, info, route, policy, tokenizer, encoder, vocab, device)


@torch.no_grad()
def generate_texts(run: PolicyRun, prompts: list[str], user_ids: list[str | None],
                   user_texts: list[str | None] | None = None, *, max_new_tokens: int = 64,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                   batch_size: int = 16) -> list[Generated]:
    """One answer per (prompt, user) row, decoded in batches where every row has its own user prefix.

    Greedy by default; `do_sample` samples at `temperature` / `top_p`, seeded by `seed`. Rows that cannot differ
    (same prompt, and the same prefix: an unpersonalized run, or the same user) are decoded once when greedy."""
    n = len(prompts)
    if len(user_ids) != n or (user_texts is not None and len(user_texts) != n):
        raise ValueError("prompts, user_ids and user_texts must have the same length")
    user_texts = user_texts if user_texts is not None else [None] * n
    use_text = run.uses_prefix and run.cfg.user_model.use_text
    keys = []
    for p, u, t in zip(prompts, user_ids, user_texts):
        idx = run.user_index(u) if run.personalized else 0
        keys.append((p, idx, (t or "") if use_text else ""))
    order = list(dict.fromkeys(keys)) if not do_sample else keys
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=run.min_new_tokens,
               eos_token_id=run.tokenizer.eos_token_id, repetition_penalty=1.0, no_repeat_ngram_size=0)
    if do_sample:
        gen.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen.update(do_sample=False)
    eos = run.tokenizer.eos_token_id
    results: list[Generated] = []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            ids = [run.encoder.prompt_ids(p) for p, _, _ in chunk]
            texts = [run.encoder.text_ids(t) if use_text else [] for _, _, t in chunk]
            out = run.policy.generate(ids, torch.tensor([idx for _, idx, _ in chunk], dtype=torch.long), texts,
                                      pad_id=run.tokenizer.pad_token_id, use_prefix=run.uses_prefix, **gen)
            for o in out:
                results.append(Generated(run.tokenizer.decode(o, skip_special_tokens=True).strip(), list(o),
                                         bool(o) and o[-1] == eos))
    if do_sample:
        return results
    by_key = dict(zip(order, results))
    return [by_key[k] for k in keys]
