"""Issue 6 catalogue: every bad input gets a clear error naming the file, line or key, before training starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from preference_data import DataError, load_records
from preference_data.io import LoadReport
from tests.conftest import tiny_overrides, toy_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "p", "chosen": "a", "rejected": "b", "user_id": "u1"}


def _file(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return p


@pytest.mark.parametrize("bad,needle", [
    ('{"prompt": "p", "chosen": ', "d.jsonl:2: malformed JSON"),
    ({"prompt": "p", "chosen": "a", "user_id": "u"}, "d.jsonl:2: missing field 'rejected'"),
    ({**GOOD, "chosen": 3}, "d.jsonl:2: field 'chosen' must be a string, got int"),
    ({**GOOD, "user_id": 17}, "d.jsonl:2: field 'user_id' must be a string"),
    ({**GOOD, "prompt": "  "}, "d.jsonl:2: field 'prompt' is empty"),
    ({**GOOD, "rejected": ""}, "d.jsonl:2: field 'rejected' is empty"),
    ({**GOOD, "rejected": "a"}, "d.jsonl:2: fields 'chosen' and 'rejected' are identical"),
    ([1, 2], "d.jsonl:2: expected a JSON object"),
])
def test_bad_records(tmp_path, bad, needle):
    path = _file(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DataError) as exc:
        load_records(path)
    assert needle in str(exc.value)


def test_skip_mode_counts(tmp_path):
    path = _file(tmp_path, [GOOD, '{"broken', {**GOOD, "chosen": "b"}, GOOD])
    report = LoadReport(str(path))
    recs = load_records(path, on_error="skip", report=report)
    assert len(recs) == 2 and len(report.skipped) == 2 and report.n_read == 4


def test_json_list_with_a_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD)[:-1] + "\n" + json.dumps(GOOD) + "\n]\n")
    for mode in ("raise", "skip"):  # one document: no record of it can be trusted, so skip mode raises too
        with pytest.raises(DataError, match=r"d\.json:4: malformed JSON"):
            load_records(path, on_error=mode)
    path.write_text(json.dumps([GOOD, GOOD], indent=2))
    assert len(load_records(path)) == 2
    path.write_text(json.dumps(GOOD) + "\n")  # JSON lines named .json, one record
    assert len(load_records(path)) == 1


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_records(tmp_path / "none.jsonl")


def test_datasets_object_and_parquet(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{**GOOD, "user_text": None, "group": None}] * 3)
    assert len(load_records(ds)) == 3
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert len(load_records(tmp_path / "d.parquet")) == 3
    bad = datasets.Dataset.from_list([{**GOOD, "chosen": "b"}])
    with pytest.raises(DataError, match="row 1"):
        load_records(bad)


def _cli(stage, overrides):
    return subprocess.run([sys.executable, "-m", f"pipelines.{stage}"] + overrides, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_stage_reports_bad_line_before_training(tmp_path):
    path = _file(tmp_path, [GOOD, {**GOOD, "rejected": "a"}])
    out = _cli("train_rm", [f"data.train_path={path}", f"output_dir={tmp_path / 'r'}", "model.name=tiny-random",
                            "report_to=none"])
    assert out.returncode == 2 and "d.jsonl:2" in out.stderr and "identical" in out.stderr
    assert not (tmp_path / "r").exists()


def test_stage_names_a_missing_model_folder_and_a_foreign_sft_run(tmp_path):
    path = _file(tmp_path, [GOOD, {**GOOD, "prompt": "q"}])
    base = [f"data.train_path={path}", "report_to=none", "train.max_steps=1"]
    out = _cli("train_rm", base + [f"output_dir={tmp_path / 'a'}", "model.name=./no/such/model"])
    assert out.returncode == 2 and "model.name './no/such/model': no such local folder" in out.stderr
    assert "Traceback" not in out.stderr
    sft = tmp_path / "sft"  # a finished train_sft run of another model than the stage's
    (sft / "checkpoint" / "adapter").mkdir(parents=True)
    (sft / "checkpoint" / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (sft / "run.json").write_text(json.dumps({"stage": "train_sft", "model_name": "other",
                                              "model": {"model_type": "gpt2", "hidden_size": 8}}))
    out = _cli("train_pdpo", base + [f"output_dir={tmp_path / 'b'}", "model.name=tiny-random",
                                      f"model.sft_run={sft}"])
    assert out.returncode == 2 and "config key 'model.sft_run'" in out.stderr and "was trained on other" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("override,needle", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'; did you mean 'train.max_steps'"),
    ("user_model.kind=hierarchical", "user_model.kind"),
    ("user_model.n_tokens=0", "'user_model.n_tokens' (T_u) must be > 0"),
    ("user_model.n_tokens=-2", "'user_model.n_tokens' (T_u) must be > 0"),
    ("loss.alpha=-0.1", "'loss.alpha' must be in [0, 1]"),
    ("loss.alpha=1.1", "'loss.alpha' must be in [0, 1]"),
    ("loss.beta=0", "'loss.beta' must be > 0"),
    ("loss.beta=-1", "'loss.beta' must be > 0"),
])
def test_config_catalogue(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_prompt_too_long_error_or_counted_truncation(tmp_path, caplog):
    from common.batching import PairEncoder
    from common.models import build_tiny_tokenizer
    from preference_data import UserVocab

    tok = build_tiny_tokenizer()
    recs = load_records(_file(tmp_path, [{**GOOD, "prompt": "x" * 50}, GOOD]))
    strict = PairEncoder(tok, 20, 16, prompt_overflow="error")
    with pytest.raises(DataError, match=r"d.jsonl record 1: prompt has 51 tokens, more than data.max_prompt_length=20"):
        strict.encode_all(recs, UserVocab(), str(tmp_path / "d.jsonl"))
    lenient = PairEncoder(tok, 20, 16, prompt_overflow="truncate")
    with caplog.at_level("WARNING"):
        pairs = lenient.encode_all(recs, UserVocab(), "d.jsonl")
    assert len(pairs[0].prompt_ids) == 20 and lenient.n_truncated_prompts == 1
    assert "truncated 1 prompt(s)" in caplog.text


def test_empty_dataset_after_filtering(tmp_path):
    from common.run import load_data

    path = _file(tmp_path, [{**GOOD, "chosen": "b"}, '{"x'])
    cfg = load_config(None, [f"data.train_path={path}", "data.on_error=skip"])
    with pytest.raises(DataError, match="no training records left after filtering"):
        load_data(cfg)


def test_missing_rm_run_for_ppo(tmp_path, toy_data):
    train, evals = toy_data
    out = _cli("train_ppo", tiny_overrides(tmp_path, train, evals, **{"ppo.rm_run": str(tmp_path / "nope")}))
    assert out.returncode == 2
    assert "ppo.rm_run" in out.stderr


def test_unseen_eval_users_are_generic_and_reported(tmp_path, caplog):
    from common.run import load_data

    rows = toy_rows(6)
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    evals = write_jsonl(tmp_path / "e.jsonl", [{**rows[0], "user_id": "stranger"}])
    cfg = load_config(None, [f"data.train_path={train}", f"data.eval_path={evals}"])
    with caplog.at_level("WARNING"):
        data = load_data(cfg)
    assert data.report["unseen_eval_users"] == ["stranger"]
    assert data.vocab.index("stranger") == 0
    assert "scored as the generic user 0" in caplog.text
