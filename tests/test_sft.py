"""train_sft, and later stages starting from it with model.sft_run."""

import json

import pytest
import torch

from common.config import ConfigError, load_config
from common.run import build_backbone, load_backbone_from_run
from conftest import tiny_overrides


def _sft_run(tmp_path, train, evals, steps=30, **extra):
    from pipelines.train_sft import run

    cfg = load_config(None, tiny_overrides(tmp_path, train, evals, **{"output_dir": str(tmp_path / "sft"),
                                                                      "train.max_steps": steps, "train.lr": 0.03,
                                                                      "user_model.kind": "uniform", **extra}))
    return cfg, run(cfg)


def test_sft_lowers_held_out_nll_and_writes_a_run_folder(tmp_path, toy_data):
    train, evals = toy_data
    _, m = _sft_run(tmp_path, train, evals)
    sft = m["eval"]["sft"]
    assert sft["eval_nll_after"] < sft["eval_nll_before"] - 0.3
    run_dir = tmp_path / "sft"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["stage"] == "train_sft" and info["route"] == "sft"
    assert (run_dir / "checkpoint" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["sft"]["eval_nll_after"] == sft["eval_nll_after"]


def test_sft_examples_keep_every_record_and_both_responses_on_request():
    from common.batching import EncodedPair
    from policy.sft_trainer import collate_sft, sft_examples

    pairs = [EncodedPair([1, 2], [3, 4], [5], 1), EncodedPair([1, 2], [3, 4], [5], 2)]
    assert [e.response_ids for e in sft_examples(pairs)] == [[3, 4], [3, 4]]
    assert [e.response_ids for e in sft_examples(pairs, "both")] == [[3, 4], [3, 4], [5], [5]]
    batch = collate_sft(sft_examples(pairs, "both"), pad_id=0)
    assert batch["labels"].tolist()[2] == [-100, -100, 5, -100]
    assert batch["user_idx"].tolist() == [0, 0, 0, 0]


def test_later_stage_reference_is_the_sft_policy(tmp_path, toy_data):
    """With model.sft_run, a new stage's reference (adapters off, pi_SFT's generic soft prompt) computes exactly
    pi_SFT, and the same holds when the finished run is loaded back for evaluation."""
    from common.batching import collate_sequences
    from policy.model import PersonalizedPolicy, response_logps

    train, evals = toy_data
    sft_cfg, _ = _sft_run(tmp_path, train, evals, steps=4)
    _, sft_backbone, *_ = load_backbone_from_run(tmp_path / "sft", torch.device("cpu"))
    batch = collate_sequences([[5, 6, 7], [8, 9]], [[10, 11], [12]], [0, 0], [[], []], pad_id=0)
    with torch.no_grad():  # pi_SFT as train_sft trained it: its adapter on, the generic user's soft prompt
        hidden, inputs = sft_backbone.hidden_states(batch)
        sft_logps = response_logps(hidden, inputs.labels, sft_backbone.lm_head)

    cfg = load_config(None, tiny_overrides(tmp_path, train, evals, **{"model.sft_run": str(tmp_path / "sft")}))
    backbone, _ = build_backbone(cfg, 3, torch.device("cpu"))
    ref = PersonalizedPolicy(backbone).reference_logps(batch)
    assert torch.allclose(ref, sft_logps, atol=1e-5)

    base_cfg = load_config(None, tiny_overrides(tmp_path, train, evals))
    base, _ = build_backbone(base_cfg, 3, torch.device("cpu"))
    assert not torch.allclose(PersonalizedPolicy(base).reference_logps(batch), sft_logps, atol=1e-3)


def test_pdpo_on_top_of_sft_evaluates_against_pi_sft(tmp_path, toy_data):
    from pipelines.train_pdpo import run

    train, evals = toy_data
    _sft_run(tmp_path, train, evals, steps=4)
    m = run(load_config(None, tiny_overrides(tmp_path, train, evals, **{"model.sft_run": str(tmp_path / "sft"),
                                                                         "train.max_steps": 2})))
    assert "per_user" in m["eval"]
    cfg, backbone, *_ = load_backbone_from_run(tmp_path / "run", torch.device("cpu"))
    assert cfg.model.sft_run == str(tmp_path / "sft")
    # the run loaded back scores against pi_SFT (its adapter merged), not against the bare base model
    from common.batching import collate_sequences
    from policy.model import PersonalizedPolicy, response_logps

    _, sft_backbone, *_ = load_backbone_from_run(tmp_path / "sft", torch.device("cpu"))
    batch = collate_sequences([[5, 6, 7], [8, 9]], [[10, 11], [12]], [0, 0], [[], []], pad_id=0)
    with torch.no_grad():
        hidden, inputs = sft_backbone.hidden_states(batch)
        sft_logps = response_logps(hidden, inputs.labels, sft_backbone.lm_head)
    assert torch.allclose(PersonalizedPolicy(backbone).reference_logps(batch), sft_logps, atol=1e-5)


@pytest.mark.parametrize("kind", ["individual", "cluster", "uniform"])
def test_a_stage_from_sft_starts_exactly_at_pi_sft(tmp_path, toy_data, kind):
    """Every user's policy is pi_SFT before the first update (issue 19, cause 5): e_0 starts at pi_SFT's soft
    prompt, the offsets and the new adapters at zero; the SFT prompt was trained (it moved from its init)."""
    from common.batching import collate_sequences
    from common.run import sft_reference_prefix
    from policy.model import PersonalizedPolicy

    train, evals = toy_data
    _sft_run(tmp_path, train, evals, steps=4)
    prefix = sft_reference_prefix(tmp_path / "sft")
    sft_cfg = load_config(tmp_path / "sft" / "config.yaml")
    untrained, _ = build_backbone(sft_cfg, 3, torch.device("cpu"))
    assert not torch.equal(prefix, untrained.user_model(torch.zeros(1, dtype=torch.long)).embeds[0])
    cfg = load_config(None, tiny_overrides(tmp_path, train, evals, **{"model.sft_run": str(tmp_path / "sft"),
                                                                       "user_model.kind": kind}))
    backbone, _ = build_backbone(cfg, 3, torch.device("cpu"))
    policy = PersonalizedPolicy(backbone)
    batch = collate_sequences([[5, 6, 7], [8, 9], [5, 9]], [[10, 11], [12], [13, 14]], [0, 1, 3], [[], [], []], 0)
    with torch.no_grad():
        assert torch.equal(policy.sequence_logps(batch), policy.reference_logps(batch))
        with torch.no_grad():
            for name, p in backbone.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5)
        assert not torch.allclose(policy.sequence_logps(batch), policy.reference_logps(batch), atol=1e-3)


def test_stage_prefix_length_must_match_the_sft_prompt(tmp_path, toy_data):
    train, evals = toy_data
    _sft_run(tmp_path, train, evals, steps=2)
    cfg = load_config(None, tiny_overrides(tmp_path, train, evals, **{"model.sft_run": str(tmp_path / "sft"),
                                                                       "user_model.n_tokens": 7}))
    with pytest.raises(ConfigError, match="user_model.n_tokens"):
        build_backbone(cfg, 3, torch.device("cpu"))


def test_sft_run_must_be_a_finished_sft_run(tmp_path, toy_data):
    train, evals = toy_data
    cfg = load_config(None, tiny_overrides(tmp_path, train, evals, **{"model.sft_run": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match="model.sft_run"):
        build_backbone(cfg, 3, torch.device("cpu"))


def test_a_missing_sft_run_is_refused_before_the_run_folder_is_written(tmp_path, toy_data):
    from pipelines.train_pdpo import run

    train, evals = toy_data
    cfg = load_config(None, tiny_overrides(tmp_path, train, evals, **{"model.sft_run": str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match="'model.sft_run' names a folder that does not exist"):
        run(cfg)
    assert not (tmp_path / "run").exists()
