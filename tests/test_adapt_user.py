"""Few-shot adaptation of a new user's embedding (issue 8): only that row moves, it is saved and reloaded, existing
users are refused without --overwrite, and a minority-like new user gains held-out accuracy over the generic user.

Runs are trained once per module with a handful of steps on tiny-random; every test that writes works on a copy.
"""

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from common.config import load_config
from tests.conftest import tiny_overrides, toy_rows, write_jsonl
from user_models import build_user_model
from user_models.adaptation import AdaptationError, fit_user_embedding, reset_user, user_table

MAJORITY_HEAVY = (("a", "majority"), ("b", "majority"), ("c", "majority"), ("d", "minority"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many tiny forward passes: with 2 threads on 2 shared cores every op waits at an OpenMP
    barrier for a thread the OS has descheduled (measured: a 30-step fit 0.8 s on 1 thread, 56 s on 2 while another
    job used one core). One thread is fast either way; the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- unit: the optimiser


def _toy_user_model(kind, n_users=4):
    torch.manual_seed(0)
    return build_user_model(kind, n_users, 2, 8, n_clusters=3, init=torch.randn(2, 8), init_std=0.5)


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_fit_moves_only_the_users_row(kind):
    um = _toy_user_model(kind)
    (new,) = um.implicit.add_users(1)
    before = {k: v.clone() for k, v in um.state_dict().items()}
    target = torch.randn(2, 8)

    def loss():  # also uses rows 0 and 2: they get gradients, but must never be updated
        e = um(torch.tensor([new, 0, 2])).embeds
        return (e[0] - target).pow(2).mean() + 0.1 * e[1:].pow(2).mean()

    res = fit_user_embedding(um, new, loss, steps=30, lr=0.1)
    assert res.final_loss < res.losses[0]
    table = user_table(um).detach()
    before_table = before["implicit.offsets.weight" if kind == "individual" else "implicit.logits.weight"]
    def others(t):
        return torch.cat([t[:new], t[new + 1:]])

    assert torch.equal(others(table), others(before_table))
    assert not torch.equal(table[new], before_table[new])
    for k, v in um.state_dict().items():
        if not k.endswith(("offsets.weight", "logits.weight")):
            assert torch.equal(v, before[k]), k  # e_0 / the centres
    assert all(p.grad is None for p in um.parameters())
    # refitting from the generic init is deterministic
    row = table[new].clone()
    reset_user(um, new)
    assert torch.equal(um(torch.tensor([new])).embeds, um(torch.tensor([0])).embeds)  # generic init = generic user
    fit_user_embedding(um, new, loss, steps=30, lr=0.1)
    assert torch.equal(user_table(um)[new], row)


def test_uniform_and_generic_user_are_refused():
    with pytest.raises(AdaptationError, match="nothing user-specific"):
        fit_user_embedding(_toy_user_model("uniform"), 1, lambda: torch.zeros(()), steps=1)
    with pytest.raises(AdaptationError, match="generic user"):
        fit_user_embedding(_toy_user_model("individual"), 0, lambda: torch.zeros(()), steps=1)


# ------------------------------------------------------------------------------------------------- tiny runs


def _new_user_rows(uid="new", n=16):
    rows = toy_rows(n, users=((uid, "minority"),))
    for r in rows:
        r["prompt"] = r["prompt"].replace("Tell me about", "What about")  # prompts unseen in training
    return rows


def _train(tmp_path, route, kind, steps):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(12, users=MAJORITY_HEAVY))
    ov = tiny_overrides(tmp_path, train, None, **{"train.max_steps": steps, "train.batch_size": 8,
                                                   "train.lr": 0.01, "user_model.kind": kind,
                                                   "user_model.n_clusters": 2, "eval.n_generation_prompts": 0})
    cfg = load_config(None, [o for o in ov if not o.startswith("data.eval_path")])
    if route == "rm":
        from pipelines.train_rm import run
    else:
        from pipelines.train_pdpo import run
    run(cfg)
    return tmp_path / "run"


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("adapt_rm")
    run_dir = _train(base, "rm", "individual", 10)
    new = _new_user_rows()
    return run_dir, write_jsonl(base / "new.jsonl", new[:8]), write_jsonl(base / "held.jsonl", new[8:])


@pytest.fixture(scope="module")
def dpo_cluster_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("adapt_dpo")
    run_dir = _train(base, "dpo", "cluster", 4)
    return run_dir, write_jsonl(base / "new.jsonl", _new_user_rows()[:6])


def _digests(run_dir):
    ckpt = run_dir / "checkpoint"
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ckpt.rglob("*")) if p.is_file()}


def _copy(run_dir, dst):
    shutil.copytree(run_dir, dst)
    return dst


def test_rm_adaptation_saves_only_the_new_row_and_helps_a_minority_user(rm_run, tmp_path, capsys):
    from common.run import load_backbone_from_run
    from pipelines.adapt_user import main
    from pipelines.evaluate import evaluate_run

    src, new_file, held = rm_run
    run_dir = _copy(src, tmp_path / "run")
    users_before = json.loads((run_dir / "users.json").read_text())["users"]
    files_before = _digests(run_dir)
    um_before = load_file(str(run_dir / "checkpoint" / "user_model.safetensors"))

    rc = main(["--run", str(run_dir), "--data", str(new_file), "--user-id", "new", "--steps", "30"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["k"] == 8 and summary["final_loss"] < summary["initial_loss"]

    users = json.loads((run_dir / "users.json").read_text())["users"]
    m = len(users_before)
    assert users == {**users_before, "new": m + 1}  # appended; existing indices untouched
    files_after = _digests(run_dir)
    changed = {f for f in files_before if files_before[f] != files_after.get(f)}
    assert changed == {"checkpoint/user_model.safetensors", "checkpoint/user_model.json"}  # LoRA and head identical
    um_after = load_file(str(run_dir / "checkpoint" / "user_model.safetensors"))
    assert torch.equal(um_after["implicit.generic"], um_before["implicit.generic"])
    old_rows = um_before["implicit.offsets.weight"]
    assert torch.equal(um_after["implicit.offsets.weight"][: m + 1], old_rows)  # o_0 and every other user
    assert um_after["implicit.offsets.weight"][m + 1].abs().sum() > 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["n_users"] == m + 1 and info["adapted_users"]["new"]["k"] == 8

    _, backbone, _, vocab, _ = load_backbone_from_run(run_dir, torch.device("cpu"))
    assert vocab.index("new") == m + 1 and backbone.user_model.n_users == m + 1

    ev = evaluate_run(run_dir, held, tmp_path / "eval")
    mine = ev["per_user"]["new"]
    assert mine["seen"] and mine["n"] == 8
    assert ev["generic"]["accuracy"] <= 0.25  # the generic user follows the majority
    assert mine["accuracy"] >= 0.75 and mine["accuracy"] > ev["generic"]["accuracy"]


def test_existing_user_refused_unless_overwrite(rm_run, tmp_path, capsys):
    from pipelines.adapt_user import adapt_user, main

    src, new_file, _ = rm_run
    run_dir = _copy(src, tmp_path / "run")
    files = _digests(run_dir)
    rc = main(["--run", str(run_dir), "--data", str(new_file), "--user-id", "d", "--steps", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert _digests(run_dir) == files

    # --overwrite refits row d from the generic init; nothing else moves and no user is added
    um_before = load_file(str(run_dir / "checkpoint" / "user_model.safetensors"))
    idx = json.loads((run_dir / "users.json").read_text())["users"]["d"]
    no_ids = [{**json.loads(line), "user_id": None} for line in new_file.read_text().splitlines()]
    s = adapt_user(run_dir, write_jsonl(tmp_path / "d.jsonl", no_ids), "d", steps=3, overwrite=True)
    assert s["k"] == 8  # no record carries a user_id: all are used
    assert s["overwrote"] and s["index"] == idx
    assert json.loads((run_dir / "users.json").read_text())["users"]["d"] == idx
    after = load_file(str(run_dir / "checkpoint" / "user_model.safetensors"))["implicit.offsets.weight"]
    rows = um_before["implicit.offsets.weight"]
    assert after.shape == rows.shape
    assert torch.equal(torch.cat([after[:idx], after[idx + 1:]]), torch.cat([rows[:idx], rows[idx + 1:]]))
    assert not torch.equal(after[idx], rows[idx])


def test_uniform_run_refused_with_clear_message(rm_run, tmp_path, capsys):
    from pipelines.adapt_user import main

    src, new_file, _ = rm_run
    run_dir = _copy(src, tmp_path / "run")
    um_json = run_dir / "checkpoint" / "user_model.json"
    um_json.write_text(json.dumps({**json.loads(um_json.read_text()), "kind": "uniform"}))
    rc = main(["--run", str(run_dir), "--data", str(new_file), "--user-id", "x"])
    assert rc == 2 and "nothing user-specific" in capsys.readouterr().err


def test_dpo_cluster_adaptation_into_a_copy(dpo_cluster_run, tmp_path):
    from common.run import load_backbone_from_run
    from pipelines.adapt_user import adapt_user

    src, new_file = dpo_cluster_run
    original = _digests(src)
    out = tmp_path / "adapted"
    s = adapt_user(src, new_file, "new", steps=10, lr=0.1, out=out)
    assert s["route"] == "dpo" and s["kind"] == "cluster" and s["n_parameters"] == 2  # K logits
    assert s["final_loss"] < s["initial_loss"]
    assert _digests(src) == original  # --out leaves the original run alone
    before = load_file(str(src / "checkpoint" / "user_model.safetensors"))
    after = load_file(str(out / "checkpoint" / "user_model.safetensors"))
    assert torch.equal(after["implicit.centres"], before["implicit.centres"])
    m = before["implicit.logits.weight"].shape[0]
    assert torch.equal(after["implicit.logits.weight"][:m], before["implicit.logits.weight"])
    # the new user's row was fitted: it is no longer the generic user's, where it starts
    assert not torch.allclose(after["implicit.logits.weight"][m], before["implicit.logits.weight"][0], atol=1e-4)
    a = _digests(out)
    assert a["checkpoint/adapter/adapter_model.safetensors"] == original["checkpoint/adapter/adapter_model.safetensors"]
    _, backbone, _, vocab, _ = load_backbone_from_run(out, torch.device("cpu"))
    w = backbone.user_model.implicit.weights(torch.tensor([vocab.index("new")]))
    assert torch.allclose(w.sum(-1), torch.ones(1))  # on the simplex


def test_learning_curve_writes_table_and_plot(rm_run, tmp_path):
    from pipelines.adapt_user import learning_curve, main

    src, new_file, held = rm_run
    original = _digests(src)
    data = write_jsonl(tmp_path / "curve.jsonl", [json.loads(line) for f in (new_file, held)
                                                   for line in f.read_text().splitlines()])
    res = learning_curve(src, data, ks=(0, 2), out=tmp_path / "curve", steps=10)  # "new" is held out
    assert [r["k"] for r in res["rows"]] == [0, 2] and res["rows"][0]["n_test"] == 14  # pairs after the first 2
    # CLI, test pairs from their own file (prompts the k shots never saw)
    rc = main(["--curve", "--run", str(src), "--data", str(new_file), "--test-data", str(held), "--ks", "0,4",
               "--steps", "20", "--out", str(tmp_path / "curve2")])
    assert rc == 0
    res = json.loads((tmp_path / "curve2" / "curve.json").read_text())
    assert [r["n_test"] for r in res["rows"]] == [8, 8]
    assert res["mean"]["4"] > res["mean"]["0"]  # a few shots beat the generic user for a minority-like user
    for f in ("curve.json", "curve.md", "curve.png"):
        assert (tmp_path / "curve2" / f).exists()
    assert "k=4" in (tmp_path / "curve2" / "curve.md").read_text()
    assert _digests(src) == original  # the curve never writes into the run


def test_a_save_stopped_between_its_renames_leaves_a_loadable_run(rm_run, tmp_path):
    """adapt_user renames the new weights into place first; killed before users.json (and the table's json)
    follow, the run still loads (the extra row is unreachable) and the next adapt_user reuses that row."""
    from common.run import load_backbone_from_run
    from pipelines.adapt_user import adapt_user

    src, new_file, _ = rm_run
    run_dir = _copy(src, tmp_path / "run")
    old = {f: (run_dir / f).read_text() for f in ("users.json", "checkpoint/user_model.json")}
    adapt_user(run_dir, new_file, "new", steps=2)
    for f, text in old.items():  # what a kill after the weights' rename leaves
        (run_dir / f).write_text(text)
    m = len(json.loads(old["users.json"])["users"])
    _, backbone, _, vocab, _ = load_backbone_from_run(run_dir, torch.device("cpu"))
    assert len(vocab) == m and backbone.user_model.n_users == m + 1
    assert "new" not in vocab
    adapt_user(run_dir, new_file, "new", steps=2)  # again: the lost save's row is reused, not a second one added
    _, backbone, _, vocab, _ = load_backbone_from_run(run_dir, torch.device("cpu"))
    assert vocab.index("new") == m + 1 and backbone.user_model.n_users == m + 1


def test_out_copy_waits_for_no_writer_and_skips_leftovers(rm_run, tmp_path):
    from pipelines.adapt_user import AdaptError, adapt_user, run_lock

    src, new_file, _ = rm_run
    run_dir = _copy(src, tmp_path / "run")
    (run_dir / "checkpoint" / ".tmp-adapt-999").mkdir()  # what a killed in-place adapt_user leaves
    with run_lock(run_dir):  # an in-place adapt_user is saving: the copy must not read the folder now
        with pytest.raises(AdaptError, match="another adapt_user"):
            adapt_user(run_dir, new_file, "new", steps=2, out=tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    adapt_user(run_dir, new_file, "new", steps=2, out=tmp_path / "copy")
    assert not list((tmp_path / "copy" / "checkpoint").glob(".tmp-*"))


# ------------------------------------------------------------------------------------- library API (live onboarding)


def test_library_adapt_user_with_a_kept_adapter_sees_other_writers(rm_run, tmp_path):
    """A server keeps one RunAdapter and onboards users from records; between its calls another writer (the CLI)
    adds a user. Each call re-reads the run's users under the lock: indices follow on, nobody's row is lost."""
    from common.run_users import RunAdapter
    from common.run_users import adapt_user as onboard
    from pipelines.adapt_user import adapt_user
    from preference_data import load_records

    src, new_file, _ = rm_run
    run_dir = _copy(src, tmp_path / "run")
    m = len(json.loads((run_dir / "users.json").read_text())["users"])
    records = load_records(new_file)  # user_id "new" on every record: used whatever the id they are fitted as
    adapter = RunAdapter(run_dir)
    s1 = onboard(run_dir, records, "new", steps=3, adapter=adapter)
    assert s1["index"] == m + 1 and s1["k"] == 8 and s1["data"] == "<records>"
    no_ids = [dataclasses.replace(r, user_id=None) for r in records]
    adapt_user(run_dir, no_ids, "cli_user", steps=3)  # another writer, its own load of the run
    rows_before = load_file(str(run_dir / "checkpoint" / "user_model.safetensors"))["implicit.offsets.weight"]
    s3 = onboard(run_dir, no_ids, "live_user", steps=3, adapter=adapter)
    assert s3["index"] == m + 3
    users = json.loads((run_dir / "users.json").read_text())["users"]
    assert [users[u] for u in ("new", "cli_user", "live_user")] == [m + 1, m + 2, m + 3]
    rows = load_file(str(run_dir / "checkpoint" / "user_model.safetensors"))["implicit.offsets.weight"]
    assert torch.equal(rows[: m + 3], rows_before)  # the CLI's user (and every other) kept, bit for bit
    with pytest.raises(AdaptationError, match="already exists"):
        onboard(run_dir, no_ids, "live_user", steps=1, adapter=adapter)
    with pytest.raises(ValueError, match="not of"):
        onboard(src, no_ids, "x", steps=1, adapter=adapter)


def test_run_lock_excludes_other_threads_and_waits_when_asked(tmp_path):
    import threading
    import time

    from common.run_users import AdaptError, run_lock

    outcome = {}

    def other(timeout, key):
        try:
            with run_lock(tmp_path, timeout=timeout):
                outcome[key] = time.monotonic()
        except AdaptError as exc:
            outcome[key] = exc

    with run_lock(tmp_path):
        t = threading.Thread(target=other, args=(0.0, "at_once"))
        t.start()
        t.join()
        waiter = threading.Thread(target=other, args=(30.0, "waits"))
        waiter.start()
        time.sleep(0.3)
        released = time.monotonic()
    waiter.join()
    assert isinstance(outcome["at_once"], AdaptError) and "another adapt_user" in str(outcome["at_once"])
    assert outcome["waits"] >= released  # it got the lock, once the holder let go


def test_the_stage_holds_no_loss_or_margin_math():
    """pipelines/adapt_user.py wires the stage; the objective and the margins are the routes' own (issue 24): its
    code names no loss, score or margin function and no loss setting."""
    import ast

    import pipelines.adapt_user as stage

    tree = ast.parse(open(stage.__file__).read())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    banned = {"bt_loss", "personalized_bt_loss", "preference_loss", "dpo_margins", "personalized_dpo_loss",
              "stochastic_dpo_loss", "logsigmoid", "softplus", "sequence_logps", "reference_logps", "pair_logps",
              "pair_rewards", "implicit_reward_margins", "reward_margins", "rm_objective", "pdpo_objective", "beta",
              "kl_coef", "alpha", "nll_weight", "label_smoothing", "loss"}
    assert not names & banned
