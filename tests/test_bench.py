"""Every benchmark of `python -m bench.run` runs on tiny-random with one or two steps and writes the contract's JSON
({"name", "machine", "rows": [{"impl", ...}]}) with its required rows."""

import json
import math
import statistics

import pytest
import torch

from bench.run import main

# small shapes; one torch thread: on a 2-core machine shared with another job, 2 threads each spin and a tiny step
# gets ~50x slower (bench/RESULTS.md)
TINY = ["--model", "tiny-random", "--device", "cpu", "--threads", "1", "--prompt-len", "8", "--response-len", "8"]


def _run(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    assert main([name, *TINY, "--json", str(out), *extra]) == 0
    data = json.loads(out.read_text())
    assert data["name"] == name
    assert isinstance(data["machine"], str) and "torch" in data["machine"]
    assert isinstance(data["rows"], list) and all("impl" in r for r in data["rows"])
    return data, {r["impl"]: r for r in data["rows"]}


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_pdpo_step_rows(tmp_path):
    threads = torch.get_num_threads()
    data, rows = _run(tmp_path, "pdpo_step", "--steps", "1", "--warmup", "1", "--batch", "2", "--peak-tflops", "1")
    assert set(rows) == {"trl_dpo", "dpo", "pdpo", "pdpo_stochastic"}
    for r in rows.values():
        assert _positive(r["step_s"]) and _positive(r["flops"]) and _positive(r["mfu"])
        assert r["vs_trl_dpo"] == pytest.approx(r["step_s"] / rows["trl_dpo"]["step_s"])
    # the exact P-DPO loss scores every pair twice (own user + generic): twice the rows of the others
    assert rows["pdpo"]["rows_per_step"] == 2 * rows["dpo"]["rows_per_step"] == 8
    assert rows["pdpo_stochastic"]["rows_per_step"] == rows["trl_dpo"]["rows_per_step"] == 4
    assert torch.get_num_threads() == threads  # --threads does not leak out of the benchmark


def test_rm_step_rows(tmp_path):
    _, rows = _run(tmp_path, "rm_step", "--steps", "1", "--warmup", "1", "--batch", "2")
    assert set(rows) == {"trl_rm", "rm", "prm", "prm_stochastic"}
    assert all(_positive(r["step_s"]) for r in rows.values())
    assert rows["prm"]["rows_per_step"] == 8 and rows["trl_rm"]["rows_per_step"] == 4
    assert rows["prm_stochastic"]["rows_per_step"] == 4


def test_rounds_pool_the_steps_of_every_round(tmp_path):
    _, rows = _run(tmp_path, "rm_step", "--steps", "2", "--warmup", "1", "--batch", "2", "--impls",
                   "trl_rm,rm", "--rounds", "2")
    assert set(rows) == {"trl_rm", "rm"}
    for r in rows.values():
        assert len(r["round_step_s"]) == 2 and r["n_timed"] == len(r["times"]) == 4
        assert r["step_s"] == pytest.approx(statistics.median(r["times"]))
    assert rows["rm"]["vs_trl_rm"] == pytest.approx(rows["rm"]["step_s"] / rows["trl_rm"]["step_s"])


def test_ppo_rollout_rows(tmp_path):
    _, rows = _run(tmp_path, "ppo_rollout", "--steps", "1", "--warmup", "0", "--batch", "4",
                   "--max-new-tokens", "4")
    assert {"naive", "batched"} <= set(rows)
    for impl in ("naive", "batched"):
        assert _positive(rows[impl]["tokens_per_s"])
        assert rows[impl]["tokens"] == 4 * 4  # EOS suppressed: every row generates max_new_tokens
    assert rows["batched"]["match_naive"] == 1.0  # greedy: batched equals per-example decoding, row for row
    it = rows["ppo_iteration"]
    assert "skipped" not in it, it
    parts = ["generate_s", "score_s", "reference_s", "policy_value_s", "train_s"]
    assert all(it[k] >= 0 for k in parts) and _positive(it["iteration_s"])
    assert sum(it[k] for k in parts) == pytest.approx(it["iteration_s"], rel=0.2)


def test_user_scale_rows_and_sparse_updates(tmp_path):
    data, _ = _run(tmp_path, "user_scale", "--users", "10,1000", "--dim", "16", "--n-tokens", "2",
                   "--clusters", "4", "--steps", "2", "--warmup", "1", "--batch", "8")
    rows = data["rows"]
    assert {(r["users"], r["kind"], r["optim"]) for r in rows} == {
        (n, k, o) for n in (10, 1000) for k in ("individual", "cluster")
        for o in ("adamw", "sparse_adam", "rowwise_adagrad")}
    for r in rows:
        assert _positive(r["bytes"]) and _positive(r["step_s"]) and r["dtype"] == "float32"
        assert r["bytes"] == pytest.approx(r["est_bytes"], rel=0.01)  # the estimate used to skip rows (+ step counters)
        if r["optim"] == "adamw":  # momentum keeps moving rows of earlier batches
            assert r["changed_rows"] >= r["batch_rows"]
        else:  # row-sparse optimizers touch only the rows of the batch
            assert r["changed_rows"] == r["batch_rows"]
    big = {(r["kind"], r["optim"]): r for r in rows if r["users"] == 1000}
    # Adam keeps two state tensors of the table's size; row-wise AdaGrad one float per row
    assert big[("individual", "rowwise_adagrad")]["bytes"] < big[("individual", "sparse_adam")]["bytes"] / 2


def test_user_scale_skips_what_does_not_fit(tmp_path):
    data, _ = _run(tmp_path, "user_scale", "--users", "10,1000000", "--dim", "576", "--n-tokens", "10",
                   "--impls", "individual", "--optims", "adamw", "--steps", "1", "--warmup", "0", "--max-gb", "0.05")
    small, huge = data["rows"]
    assert small["users"] == 10 and _positive(small["step_s"])
    assert huge["users"] == 1_000_000 and huge["step_s"] is None and huge["estimated"]
    assert huge["skipped"].startswith("would need float32: ") and "GB" in huge["skipped"]
    assert huge["bytes"] == 3 * (1_000_001 * 10 * 576 + 10 * 576) * 4  # params + 2 AdamW moments, float32


def test_serve_rows(tmp_path):
    """The serve benchmark through the real server: both impls at each concurrency, every request answered, and
    batched greedy decoding gives every request the answer it gets one at a time."""
    data, _ = _run(tmp_path, "serve", "--concurrency", "1,4", "--requests", "4", "--max-new-tokens", "4",
                   "--n-users", "3")
    rows = data["rows"]
    assert [(r["impl"], r["concurrency"]) for r in rows] == [("sequential", 1), ("batched", 1), ("sequential", 4),
                                                             ("batched", 4)]
    for r in rows:
        assert r["requests"] == 4 and r["tokens"] == 4 * 4  # tiny-random never picks EOS in 4 tokens
        assert _positive(r["tokens_per_s"]) and r["p95_latency_s"] >= r["p50_latency_s"] > 0
        assert r["users"] == 4  # 4 requests, 4 different users (of 3 users, the generic one and an unseen id)
    for r in rows[1::2]:
        assert r["match_sequential"] == 1.0 and _positive(r["speedup"])


def test_profile_step_attributes_the_step_to_operators(tmp_path):
    from bench import profile_step

    out = tmp_path / "profile.json"
    result = profile_step.main(["--model", "tiny-random", "--steps", "1", "--dtypes", "float32", "--threads", "1",
                                "--set", "model.attn_implementation=eager", "--top", "500", "--json", str(out)])
    (prof,) = result["profiles"]
    assert prof["step_s"] > 0 and json.loads(out.read_text())["profiles"][0]["impl"] == "dpo"
    assert math.isclose(sum(prof["families"].values()), 1.0, rel_tol=1e-6)
    ops = {op["op"] for op in prof["top_ops"]}
    assert "aten::bmm" in ops  # eager attention: batched matrix products, not the fused kernel
    assert not any("scaled_dot_product" in op for op in ops)
    with pytest.raises(SystemExit):
        profile_step.main(["--set", "no-equals-sign"])
