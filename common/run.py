"""Run folders (contract layout): set up, load data, build the personalized backbone, save and reload artifacts."""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import checkpoint as ckpt
from common import dist
from common.backbone import PersonalizedBackbone, apply_finetune, init_prefix_from_vocab, quiet_peft_wrap
from common.config import Config, ConfigError, dump_yaml, load_config
from common.models import load_causal_lm, model_fingerprint
from preference_data import DataError, UserVocab, load_records
from preference_data.io import LoadReport
from user_models import build_user_model, load_user_model

log = logging.getLogger(__name__)

RUN_INFO = "run.json"
STAGE_ROUTES = {"train_sft": "sft", "train_rm": "rm", "train_pdpo": "dpo", "train_ppo": "ppo"}
REFERENCE_PREFIX = "reference_prefix.safetensors"  # in checkpoint/: the reference policy's soft prompt


def run_route(info: dict) -> str:
    """"sft", "rm", "dpo" or "ppo": the route of a finished run, from its run.json."""
    route = info.get("route") or STAGE_ROUTES.get(info.get("stage"))
    if route is None:
        raise ValueError(f"run.json names no route and an unknown stage {info.get('stage')!r}")
    return route


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run folder and write its config.yaml, after checking that a checkpoint already in it (which
    train.resume=auto will continue) belongs to this run: a refused run must not leave the folder's config and
    users.json describing a run its checkpoints are not from."""
    run_dir = Path(cfg.output_dir)
    if cfg.model.sft_run:
        check_sft_run(Path(cfg.model.sft_run))
    if cfg.train.resume == "auto" and (latest := ckpt.latest_checkpoint(run_dir / "checkpoints")) is not None:
        from common.trainer import check_resumable, run_settings

        check_resumable(latest, run_settings(cfg), cfg.train.max_steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():  # with several processes rank 0 writes the run folder
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(dump_yaml(cfg))
        os.replace(tmp, run_dir / "config.yaml")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.seed)
    return run_dir


@dataclass
class Data:
    train: list
    eval: list
    vocab: UserVocab
    report: dict


def load_data(cfg: Config, need_train: bool = True) -> Data:
    """Read and validate train/eval records before any model is loaded."""
    d = cfg.data
    if need_train and not d.train_path:
        raise ConfigError("config key 'data.train_path' is required for training")
    report = {}
    train, evals = [], []
    if d.train_path:
        rep = LoadReport(d.train_path)
        train = load_records(d.train_path, on_error=d.on_error, report=rep)
        if d.max_train_records:
            train = train[: d.max_train_records]
        report["train"] = {"read": rep.n_read, "kept": len(train), "skipped": len(rep.skipped)}
        if need_train and not train:
            raise DataError(f"{d.train_path}: no training records left after filtering "
                            f"({rep.n_read} read, {len(rep.skipped)} skipped)")
    if d.eval_path:
        rep = LoadReport(d.eval_path)
        evals = load_records(d.eval_path, on_error=d.on_error, report=rep)
        if d.max_eval_records:
            evals = evals[: d.max_eval_records]
        report["eval"] = {"read": rep.n_read, "kept": len(evals), "skipped": len(rep.skipped)}
    vocab = UserVocab.from_records(train)
    unseen = sorted({r.user_id for r in evals if r.user_id is not None and r.user_id not in vocab})
    if unseen:
        log.warning("%d held-out user(s) are absent from training and are scored as the generic user 0: %s",
                    len(unseen), unseen[:10])
        report["unseen_eval_users"] = unseen
    return Data(train, evals, vocab, report)


def resolve_dtypes(cfg: Config) -> tuple[torch.dtype, torch.dtype]:
    """(compute, storage) dtypes of the LLM for this config on its device (`train.dtype`, `model.dtype`)."""
    from common import precision

    compute = precision.compute_dtype(cfg.train.dtype, pick_device(cfg))
    return compute, precision.storage_dtype(cfg.model.dtype, cfg.model.finetune, compute)


def resolve_attn_implementation(cfg: Config, compute: torch.dtype) -> str:
    """`model.attn_implementation` for this config's device and compute dtype (see its doc in common/config.py)."""
    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    return "eager" if compute == torch.bfloat16 and pick_device(cfg).type == "cpu" else "sdpa"


def load_start_lm(cfg: Config):
    """(causal LM, tokenizer) a stage starts from: `model.name`, with the `model.sft_run` adapter merged in."""
    from common.precision import describe

    compute, storage = resolve_dtypes(cfg)
    lm, tokenizer = load_causal_lm(cfg.model.name, describe(storage), cfg.model.trust_remote_code,
                                   cfg.model.revision, resolve_attn_implementation(cfg, compute))
    if cfg.model.sft_run:
        lm = merge_sft_adapter(lm, Path(cfg.model.sft_run))
    return lm, tokenizer


def check_sft_run(sft_run: Path) -> dict:
    """run.json of a finished train_sft run with a LoRA adapter, or ConfigError naming model.sft_run. Checked when
    a stage starts, not in validate(): the demo validates every stage before its train_sft has run."""
    sft_run = Path(sft_run)
    if not sft_run.is_dir():
        raise ConfigError(f"config key 'model.sft_run' names a folder that does not exist: {sft_run}")
    adapter = sft_run / "checkpoint" / "adapter" / "adapter_model.safetensors"
    info = json.loads((sft_run / RUN_INFO).read_text()) if (sft_run / RUN_INFO).exists() else {}
    if info.get("stage") != "train_sft" or not adapter.exists():
        raise ConfigError(f"config key 'model.sft_run' must be a finished train_sft run with a LoRA adapter: "
                          f"{sft_run} has run.json stage {info.get('stage')!r}, adapter "
                          f"{'present' if adapter.exists() else 'missing'}")
    return info


def merge_sft_adapter(lm, sft_run: Path):
    """Fold a train_sft run's LoRA into the weights. Later adapters train on top of it, and switching them off
    (the reference policy) gives back exactly pi_SFT."""
    from peft import PeftModel

    info = check_sft_run(sft_run)
    if info["model"] != model_fingerprint(lm):
        raise ConfigError(f"config key 'model.sft_run': {sft_run} was trained on {info['model_name']} "
                          f"{info['model']}, not on this stage's model {model_fingerprint(lm)}")
    with quiet_peft_wrap():
        peft_model = PeftModel.from_pretrained(lm, str(sft_run / "checkpoint" / "adapter"), is_trainable=False)
    return peft_model.merge_and_unload()


def sft_reference_prefix(sft_run: str | Path | None) -> torch.Tensor | None:
    """The generic user's soft prompt [T_u, d] of a train_sft run that trained one (run.json `reference_prefix`),
    else None (no SFT run, or one from before SFT trained a prefix: its pi_SFT has no prefix)."""
    if not sft_run:
        return None
    info = check_sft_run(Path(sft_run))
    if not info.get("reference_prefix"):
        return None
    um = load_user_model(Path(sft_run) / "checkpoint")
    with torch.no_grad():
        return um(torch.zeros(1, dtype=torch.long)).embeds[0].float().clone()


def build_backbone(cfg: Config, n_users: int, device: torch.device):
    """(backbone, tokenizer): the causal LM with `model.finetune` applied and a fresh user model.

    From a `model.sft_run` with a soft prompt, every user starts at that prompt (individual: e_0 = it, o_i = 0;
    cluster: every centre = it; uniform: it) and it is the reference's prefix: with the new adapters at zero, the
    model starts exactly at pi_SFT."""
    lm, tokenizer = load_start_lm(cfg)
    embed = lm.get_input_embeddings()
    um = cfg.user_model
    init_std = um.init_std * float(embed.weight.detach().std())
    reference_prefix = sft_reference_prefix(cfg.model.sft_run)
    if reference_prefix is not None:
        if tuple(reference_prefix.shape) != (um.n_tokens, embed.embedding_dim):
            raise ConfigError(f"config key 'user_model.n_tokens' is {um.n_tokens}, but the soft prompt of "
                              f"model.sft_run={cfg.model.sft_run} has {reference_prefix.shape[0]} tokens: set them "
                              "equal, so that this stage starts at pi_SFT")
        init = reference_prefix
        if um.kind == "cluster":  # equal centres: every mixture is pi_SFT's prompt; the users' gradients split them
            init, init_std = reference_prefix.expand(um.n_clusters, -1, -1).clone(), 0.0
    else:
        init = init_prefix_from_vocab(embed, um.n_tokens, cfg.seed)
        if um.kind == "cluster":
            # Distinct centres from the start (each from other real tokens, centre 0 = the shared start): with
            # near-equal centres every mixture is the same prefix and the users' weights get no signal to separate.
            init = torch.stack([init] + [init_prefix_from_vocab(embed, um.n_tokens, cfg.seed + 1 + k)
                                         for k in range(um.n_clusters - 1)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 17)
        user_model = build_user_model(um.kind, n_users, um.n_tokens, embed.embedding_dim, um.n_clusters,
                                      um.use_text, init=init, init_std=init_std, sparse=um.sparse)
    lm = apply_finetune(lm, cfg.model)
    backbone = PersonalizedBackbone(lm, user_model, reference_prefix, compute_dtype=resolve_dtypes(cfg)[0]).to(device)
    backbone.keep_frozen_reference()
    return backbone, tokenizer


def write_run_info(run_dir: Path, cfg: Config, stage: str, backbone: PersonalizedBackbone, vocab: UserVocab,
                   extra: dict | None = None) -> None:
    if not dist.is_main():
        return
    from common.precision import describe

    info = {"stage": stage, "model_name": cfg.model.name, "model": model_fingerprint(backbone.base_lm),
            "dtype": {"compute": describe(backbone.compute_dtype),
                      "storage": describe(next(backbone.base_lm.parameters()).dtype)},
            "n_users": len(vocab), "user_model": backbone.user_model.describe(), **(extra or {})}
    tmp = run_dir / (RUN_INFO + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, run_dir / RUN_INFO)


def save_artifacts(run_dir: Path, backbone: PersonalizedBackbone, heads: dict[str, torch.nn.Module]) -> Path:
    """Final artifacts in `checkpoint/`: user model, PEFT adapter, head weights (all safetensors), atomically.
    Rank 0 writes them; every rank holds the same weights."""
    import shutil
    from safetensors.torch import save_file

    final = run_dir / "checkpoint"
    if not dist.is_main():
        return final
    tmp = run_dir / ".tmp-checkpoint"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    backbone.user_model.save(tmp)
    backbone.save_llm(tmp)
    if backbone.reference_prefix is not None:  # pi_SFT's soft prompt: the run's reference needs it
        save_file({"prefix": backbone.reference_prefix.detach().float().contiguous().cpu()},
                  str(tmp / REFERENCE_PREFIX))
    for name, head in heads.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()},
                  str(tmp / f"{name}_head.safetensors"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    return load_config(run_dir / "config.yaml")


def load_backbone_from_run(run_dir: str | Path, device: torch.device, cfg: Config | None = None):
    """(cfg, backbone, tokenizer, vocab, info) of a finished run, refusing mismatched pieces."""
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    ckpt = run_dir / "checkpoint"
    if not (ckpt / "user_model.json").exists():
        raise FileNotFoundError(f"{run_dir}: run has no final checkpoint/ (did training finish?)")
    info = json.loads((run_dir / RUN_INFO).read_text())
    vocab = UserVocab.load(run_dir / "users.json")
    user_model = load_user_model(ckpt)
    if user_model.n_users > len(vocab):  # rows appended by an adapt_user stopped before users.json: unreachable
        log.warning("%s: the user table has %d row(s) without a users.json entry (an adapt_user stopped while "
                    "saving); they are ignored, and the next adapt_user reuses them", run_dir,
                    user_model.n_users - len(vocab))
    if user_model.n_users < len(vocab):
        raise DataError(f"{run_dir}: user model has {user_model.n_users} users but users.json has {len(vocab)}: "
                        "the user vocabulary does not belong to this user model")
    lm, tokenizer = load_start_lm(cfg)
    fp = model_fingerprint(lm)
    if fp != info["model"]:
        raise ConfigError(f"{run_dir}: trained on model {info['model_name']} {info['model']}, "
                          f"but model.name={cfg.model.name} gives {fp}")
    lm = apply_finetune(lm, cfg.model)
    reference_prefix = None
    if (ckpt / REFERENCE_PREFIX).exists():
        from safetensors.torch import load_file

        reference_prefix = load_file(str(ckpt / REFERENCE_PREFIX))["prefix"]
    backbone = PersonalizedBackbone(lm, user_model, reference_prefix, compute_dtype=resolve_dtypes(cfg)[0])
    backbone.keep_frozen_reference()  # full fine-tune: copy the base weights *before* loading the trained ones
    backbone.load_llm(ckpt)
    backbone.to(device).eval()
    return cfg, backbone, tokenizer, vocab, info


def load_head(run_dir: Path, name: str, head: torch.nn.Module) -> torch.nn.Module:
    from safetensors.torch import load_file

    head.load_state_dict(load_file(str(Path(run_dir) / "checkpoint" / f"{name}_head.safetensors")))
    return head
