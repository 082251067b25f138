"""P-DPO training: cached reference log-probs, batches of pairs -> `policy.dpo_objective.pdpo_objective`, on
`common.trainer`."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from common import dist
from common.batching import EncodedPair, collate_pairs
from common.config import Config
from common.trainer import TrainLoop, batch_indices, drop_to_generic, param_groups
from policy.dpo_objective import pdpo_objective
from policy.model import PersonalizedPolicy
from policy.scoring import pair_logps

log = logging.getLogger(__name__)


def _pairs_digest(pairs: list[EncodedPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()[:16]


def cached_reference_logps(policy: PersonalizedPolicy, pairs: list[EncodedPair], pad_id: int, batch_size: int,
                           device, cache: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_SFT(y_w|x), log pi_SFT(y_l|x) for every pair, computed once. They depend neither on the user nor on
    training, so they are stored beside the run (keyed by the token ids, checked against two recomputed pairs)
    and reused on resume. With several
    processes each computes them (every rank may draw any pair) and rank 0 stores them."""
    digest = _pairs_digest(pairs)
    if cache is not None and cache.exists():
        stored = load_file(str(cache))
        if "digest" in stored and bytes(stored["digest"].tolist()).decode() == digest:
            # The token ids match; the reference policy must too (another pi_SFT, dtype or model with the same
            # tokenizer would make them stale): recompute two pairs and compare.
            probe = pairs[:2]
            c, r = pair_logps(policy, probe, pad_id, batch_size, device, reference=True)
            n = len(probe)
            if (torch.allclose(c, stored["chosen"][:n], rtol=1e-3, atol=1e-3)
                    and torch.allclose(r, stored["rejected"][:n], rtol=1e-3, atol=1e-3)):
                return stored["chosen"], stored["rejected"]
            log.warning("%s was computed with another reference policy (log-prob %.4f there, %.4f now): "
                        "recomputing", cache, float(stored["chosen"][0]), float(c[0]))
    with tqdm(total=len(pairs), desc="reference log-probs", dynamic_ncols=True, disable=not dist.is_main()) as bar:
        chosen, rejected = pair_logps(policy, pairs, pad_id, batch_size, device, reference=True, progress=bar)
    if cache is not None and dist.is_main():
        tmp = cache.with_name(cache.name + ".tmp")
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous(),
                   "digest": torch.tensor(list(digest.encode()), dtype=torch.uint8)}, str(tmp))
        tmp.replace(cache)
    return chosen, rejected


class PersonalizedDPOTrainer:
    def __init__(self, cfg: Config, policy: PersonalizedPolicy, train_pairs: list[EncodedPair], pad_id: int,
                 device, run_dir: Path, tracker=None, eval_fn=None):
        self.cfg, self.policy, self.pairs, self.pad_id, self.device = cfg, policy, train_pairs, pad_id, device
        self.ref_chosen, self.ref_rejected = cached_reference_logps(
            policy, train_pairs, pad_id, cfg.train.eval_batch_size, device, Path(run_dir) / "ref_logps.safetensors")
        self.loop = TrainLoop(cfg, run_dir, policy, param_groups(policy.backbone, cfg, []), self.loss,
                              eval_fn=eval_fn, tracker=tracker, desc="train_pdpo")

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        cfg, tr = self.cfg, self.cfg.train
        idx = batch_indices(len(self.pairs), tr.batch_size, cfg.seed, step, micro, tr.grad_accum)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step * 131 + micro)
        batch = collate_pairs([self.pairs[i] for i in idx], self.pad_id)
        users = drop_to_generic(batch["user_idx"][:len(idx)], cfg.user_model.dropout_to_generic, g)
        return pdpo_objective(self.policy, batch, users, self.ref_chosen[idx], self.ref_rejected[idx], cfg.loss, g)

    def train(self) -> dict:
        return self.loop.run()
