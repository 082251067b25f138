import json
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# train.dtype=auto means bfloat16 on CPUs with native bf16 and float32 elsewhere: pin it, so that every test computes
# the same numbers on every machine (tests of bfloat16 ask for it explicitly). Subprocesses inherit it.
os.environ.setdefault("PRLHF_AUTO_DTYPE", "float32")
# Tiny models gain nothing from a second thread, and spinning OpenMP threads stall when other jobs share the
# cores (measured 50x slower); subprocess tests set OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)


def toy_rows(n_prompts=12, users=(("a", "majority"), ("b", "minority"))):
    """Two users with conflicting preferences: the majority wants the long answer, the minority the short one."""
    topics = ["rivers", "bread", "stars", "music", "chess", "rain", "maps", "tea", "bees", "clocks", "ships", "salt",
              "glass", "paper", "wind", "owls"]
    rows = []
    for i in range(n_prompts):
        t = topics[i % len(topics)]
        short = f"{t.title()} matter."
        long = f"{t.title()} matter for many reasons, and here are several details about {t} worth knowing."
        for uid, group in users:
            chosen, rejected = (long, short) if group == "majority" else (short, long)
            rows.append({"prompt": f"Tell me about {t} ({i}).", "chosen": chosen, "rejected": rejected,
                         "user_id": uid, "user_text": None, "group": group})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy_data(tmp_path):
    rows = toy_rows(12)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:16])
    evals = write_jsonl(tmp_path / "eval.jsonl", rows[16:])
    return train, evals


def tiny_overrides(tmp_path, train, evals, **extra):
    base = {"model.name": "tiny-random", "output_dir": str(tmp_path / "run"), "data.train_path": str(train),
            "data.eval_path": str(evals), "train.max_steps": 4, "train.batch_size": 4, "report_to": "none",
            "train.lr": 0.003, "eval.n_generation_prompts": 2, "eval.max_new_tokens": 6}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
