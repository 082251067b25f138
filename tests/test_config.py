import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, all_keys, config_reference_markdown, load_config

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = ["model.name", "output_dir", "seed", "data.train_path", "data.eval_path", "train.max_steps",
                 "train.save_every", "train.resume", "user_model.kind", "user_model.n_tokens",
                 "user_model.n_clusters", "loss.alpha", "loss.beta", "report_to"]


def test_contract_keys_exist():
    keys = all_keys()
    for k in CONTRACT_KEYS:
        assert k in keys


def test_overrides_and_types():
    cfg = load_config(None, ["train.max_steps=7", "loss.alpha=0.25", "train.lr=1e-4", "model.lora_target_modules=[q_proj]"])
    assert cfg.train.max_steps == 7 and cfg.loss.alpha == 0.25 and cfg.train.lr == 1e-4
    assert cfg.model.lora_target_modules == ["q_proj"]


@pytest.mark.parametrize("override,needle", [
    ("train.max_step=3", "did you mean 'train.max_steps'"),
    ("user_model.kind=nope", "user_model.kind"),
    ("train.max_steps=abc", "must be an integer"),
    ("user_model.n_tokens=0", "user_model.n_tokens"),
    ("loss.alpha=1.5", "loss.alpha"),
    ("loss.beta=0", "loss.beta"),
    ("report_to=tensorboard", "report_to"),
    ("data.max_train_records=-5", "data.max_train_records"),  # would have cut the last 5 records silently
    ("data.max_user_text_length=-3", "data.max_user_text_length"),
    ("ppo.rollout_batch_size=0", "ppo.rollout_batch_size"),
    ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("ppo.ppo_epochs=0", "ppo.ppo_epochs"),
    ("model.lora_r=0", "model.lora_r"),
    ("model.lora_dropout=1.5", "model.lora_dropout"),
    ("train.warmup_steps=-4", "train.warmup_steps"),
    ("ppo.clip_range=-0.2", "ppo.clip_range"),
    ("eval.generation_users=-2", "eval.generation_users"),
    ("loss.beta=.inf", "'loss.beta' must be a finite number"),
    ("train.lr=.nan", "'train.lr' must be a finite number"),
    ("train=0", "'train' is a section"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'train.lrr'; did you mean 'train.lr'"):
        load_config(p)


def test_a_section_given_a_scalar_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: 0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: section 'train' must be a mapping"):
        load_config(p)
    p.write_text("train:\n")  # an empty section keeps its defaults
    assert load_config(p).train.max_steps == load_config(None).train.max_steps


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert any(f.parent.name == "demo" for f in files)
    for f in files:
        load_config(f)


def test_config_reference_in_sync():
    text = (ROOT / "configs" / "README.md").read_text()
    assert config_reference_markdown() in text, "regenerate: python -m common.config_doc > configs/README.md"


@pytest.mark.parametrize("stage", ["train_rm", "train_pdpo", "train_ppo"])
def test_help_lists_keys(stage):
    out = subprocess.run([sys.executable, "-m", f"pipelines.{stage}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for k in CONTRACT_KEYS:
        assert k in out.stdout


def test_stage_fails_before_loading_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipelines.train_rm", "user_model.kind=bogus",
                          f"output_dir={tmp_path / 'r'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "user_model.kind" in out.stderr
    assert not (tmp_path / "r").exists()
