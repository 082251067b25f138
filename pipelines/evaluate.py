"""`python -m pipelines.evaluate --run RUN_DIR --data FILE.jsonl [--out DIR] [key=value ...]`

Scores a comparison file with a finished run of any route and writes the contract's metrics.json, per-user plots
and a short report. RM route: r(x, y_w, u) > r(x, y_l, u). DPO and PPO routes: the implicit reward
beta * log pi(y|x,u) / pi_ref(y|x). Unseen users are scored with the generic embedding and reported as unseen.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from common import plots
from common.batching import PairEncoder
from common.config import ConfigError, help_text, load_config, parse_override
from common.metrics import accuracy_metrics, user_key
from common.run import load_backbone_from_run, pick_device, run_route, seed_everything
from common.tracking import Tracker
from preference_data import DataError, load_records
from preference_data.vocab import UserVocab

log = logging.getLogger(__name__)


def _generation_users(records, vocab: UserVocab, limit: int) -> dict[str, int]:
    users = []
    for r in records:
        if r.user_id is not None and r.user_id in vocab and r.user_id not in users:
            users.append(r.user_id)
    users = sorted(users, key=lambda u: vocab.index(u))
    if limit:
        users = users[:limit]
    return {**{u: vocab.index(u) for u in users}, "<generic>": 0}


def _mean_by_group(per_label: dict[str, float], groups: dict[str, str | None]) -> dict[str, float]:
    """Mean of a per-label generation statistic over each group's users. The generic user and the reference
    (labels in <angle brackets>) stand alone under their own names; a user without a group is left out (its own
    number is in the per-user table), so data without groups gives the same columns for every statistic."""
    grouped: dict[str, list[float]] = {}
    for label, value in per_label.items():
        key = groups.get(label) or (label if label.startswith("<") else None)
        if key is not None:
            grouped.setdefault(key, []).append(value)
    return {g: sum(v) / len(v) for g, v in grouped.items()}


def evaluate_run(run_dir: str | Path, data: str | Path | list, out: str | Path | None = None,
                 overrides: list[str] | None = None, tracker: Tracker | None = None) -> dict:
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    out = Path(out) if out else run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    records = data if isinstance(data, list) else load_records(data, on_error=cfg.data.on_error)
    if not records:
        raise DataError(f"{data}: no records to evaluate")
    seed_everything(cfg.seed)
    device = pick_device(cfg)
    t0 = time.time()
    cfg, backbone, tokenizer, vocab, info = load_backbone_from_run(run_dir, device, cfg)
    route = run_route(info)
    if route == "sft":
        raise ValueError(f"{run_dir} is a train_sft run: it ranks no pairs (its held-out NLL is in its metrics.json)")
    encoder = scoring_encoder(tokenizer, cfg, backbone)
    pairs = encoder.encode_all(records, vocab, str(data) if not isinstance(data, list) else "eval")
    scoring = {"max_response_length": encoder.max_response, "complete": cfg.eval.max_response_length is None,
               "truncated_responses": encoder.n_truncated_responses,
               "truncated_prompts": encoder.n_truncated_prompts}
    pad_id, bs = tokenizer.pad_token_id, cfg.train.eval_batch_size
    generation = None
    if route == "rm":
        from reward.model import load_reward_model
        from reward.scoring import reward_margins

        rm = load_reward_model(run_dir, cfg, backbone).to(device).eval()
        margins = reward_margins(rm, pairs, pad_id, bs, device)
        generic = reward_margins(rm, pairs, pad_id, bs, device, as_generic=True)
    else:
        from policy.dpo_objective import route_beta
        from policy.generation import generate_per_user
        from policy.model import PersonalizedPolicy
        from policy.scoring import implicit_reward_margins, pair_logps

        policy = PersonalizedPolicy(backbone).to(device).eval()
        ref_w, ref_l = pair_logps(policy, pairs, pad_id, bs, device, reference=True)
        pol_w, pol_l = pair_logps(policy, pairs, pad_id, bs, device)
        gen_w, gen_l = pair_logps(policy, pairs, pad_id, bs, device, as_generic=True)
        beta = route_beta(cfg, route)  # a PPO policy's implicit reward has beta = ppo.kl_coef
        margins = implicit_reward_margins(pol_w, pol_l, ref_w, ref_l, beta)
        generic = implicit_reward_margins(gen_w, gen_l, ref_w, ref_l, beta)
        if cfg.eval.n_generation_prompts > 0:
            prompts = list(dict.fromkeys(r.prompt for r in records))[: cfg.eval.n_generation_prompts]
            users = _generation_users(records, vocab, cfg.eval.generation_users)
            # a PPO policy is decoded under the EOS rule its rollouts were sampled (and its log-probs trained) with
            min_new = cfg.ppo.min_new_tokens if route == "ppo" else 0
            generation = generate_per_user(policy, encoder, prompts, users, cfg.eval.max_new_tokens, pad_id, bs,
                                           min_new_tokens=min_new)
            if route == "ppo":
                generation["rm_reward"] = _rm_rewards_of_generations(info.get("rm_run") or cfg.ppo.rm_run,
                                                                     generation, users, device)
    words = (generation or {}).get("users", {})
    metrics = accuracy_metrics(route, records, vocab, margins, generic, response_words=words)
    if generation is not None:
        metrics["generation"] = generation
        groups = {u: v["group"] for u, v in metrics["per_user"].items()}
        metrics["generation"]["per_group"] = {g: v for g, v in _mean_by_group(words, groups).items()
                                              if not g.startswith("<")}
        for key in ("response_tokens", "distinct_token_share"):
            metrics["generation"][f"{key}_per_group"] = _mean_by_group(generation.get(key, {}), groups)
    weights = cluster_weights(backbone.user_model, vocab)
    if weights is not None:
        metrics["cluster_weights"] = weights
    metrics["scoring"] = scoring
    metrics["run"] = str(run_dir)
    metrics["data"] = str(data) if not isinstance(data, list) else "<records>"
    metrics["wall_s"] = time.time() - t0
    _write(out, metrics, route, run_dir)
    own_tracker = tracker is None
    tracker = tracker or Tracker(cfg, out, job_type="eval")
    log_metrics(tracker, metrics)
    if own_tracker:
        tracker.finish()
    return metrics


def cluster_weights(user_model, vocab: UserVocab) -> dict[str, list[float]] | None:
    """A cluster user model's w_i = softmax(a_i) over its K centres for every seen user and the generic user
    (`<generic>`); None for other kinds. Which centre a user leans on is the model's own account of who agrees
    with whom, learned without group labels: set beside the data's groups, it shows whether the groups were found."""
    if user_model.kind != "cluster":
        return None
    names = ["<generic>"] + vocab.ids  # vocab index i is row i of the table
    rows = torch.arange(len(names), device=user_model.implicit.logits.weight.device)
    with torch.no_grad():
        w = user_model.implicit.weights(rows).float().cpu()
    return {name: [round(float(x), 4) for x in row] for name, row in zip(names, w)}


def scoring_encoder(tokenizer, cfg, backbone) -> PairEncoder:
    """The encoder of held-out pairs: the run's prompt layout, responses whole (`eval.max_response_length` null: as
    many tokens as the model's context leaves after the prompt and the user prefix) or cut at N when asked. A
    reward that only held up inside the training window would otherwise look better than it is."""
    encoder = PairEncoder.from_config(tokenizer, cfg)
    if cfg.eval.max_response_length is not None:
        encoder.max_response = cfg.eval.max_response_length
    else:
        context = getattr(backbone.base_lm.config, "max_position_embeddings", None) or 4096
        encoder.max_response = max(context - cfg.data.max_prompt_length - backbone.user_model.n_tokens
                                   - cfg.data.max_user_text_length, 1)
    return encoder


def _rm_rewards_of_generations(rm_run: str, generation: dict, users: dict, device) -> dict:
    """Mean RM reward of each user's greedy responses, scored for that user (PPO runs)."""
    from policy.ppo.roles import load_reward_role

    return load_reward_role(rm_run, device).score_texts_per_user(generation, users)


def log_metrics(tracker: Tracker, metrics: dict) -> None:
    flat = {"eval/accuracy/overall": metrics["overall"]["accuracy"]}
    if metrics.get("generic"):
        flat["eval/accuracy/generic"] = metrics["generic"]["accuracy"]
    for u, v in metrics["per_user"].items():
        flat[f"eval/accuracy/user/{u}"] = v["accuracy"]
        flat[f"eval/margin/user/{u}"] = v.get("mean_margin")
        if v.get("mean_response_words") is not None:
            flat[f"eval/response_words/user/{u}"] = v["mean_response_words"]
    for g, v in metrics["per_group"].items():
        flat[f"eval/accuracy/group/{g}"] = v["accuracy"]
        flat[f"eval/margin/group/{g}"] = v.get("mean_margin")
    gen = metrics.get("generation") or {}
    for label, w in gen.get("users", {}).items():
        flat[f"eval/response_words/user/{label}"] = w
    tracker.log(flat)
    tracker.summary(flat)
    rows = [[u, v["accuracy"], v.get("mean_margin"), v["n"], v["seen"], v["group"], v.get("mean_response_words")]
            for u, v in metrics["per_user"].items()]
    tracker.log_table("eval/per_user", ["user", "accuracy", "mean_margin", "n", "seen", "group",
                                        "mean_response_words"], rows)
    if metrics.get("cluster_weights"):
        weights = metrics["cluster_weights"]
        k = len(next(iter(weights.values())))
        tracker.log_table("eval/cluster_weights", ["user"] + [f"centre_{j + 1}" for j in range(k)],
                          [[u, *w] for u, w in weights.items()])
    tracker.log_bar("eval/per_user_accuracy_chart", [r[0] for r in rows], [r[1] or 0.0 for r in rows],
                    f"per-user accuracy ({metrics['route']})")


def _write(out: Path, metrics: dict, route: str, run_dir: Path) -> None:
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, out / "metrics.json")
    pngs = [plots.per_user_accuracy(metrics, out / "plots" / "per_user_accuracy.png",
                                    f"{run_dir.name}: per-user accuracy ({route})")]
    gen = metrics.get("generation")
    if gen:
        pngs.append(plots.grouped_bars({"greedy response": gen["users"]}, out / "plots" / "response_words.png",
                                       f"{run_dir.name}: mean response length per user", "words"))
    sc = metrics.get("scoring") or {}
    window = ("responses scored whole" if sc.get("complete") else
              f"responses cut at {sc.get('max_response_length')} tokens ({sc.get('truncated_responses')} cut)")
    lines = [f"# Evaluation of `{run_dir}` ({route} route)", "",
             f"Data: `{metrics['data']}` ({window}); overall accuracy {_fmt(metrics['overall']['accuracy'])} "
             f"(n={metrics['overall']['n']}); every pair as the generic user: "
             f"{_fmt((metrics.get('generic') or {}).get('accuracy'))}.", "",
             "Mean margin: the mean reward (or implicit reward) of the chosen response minus the rejected one's.", "",
             "| group | accuracy | mean margin | n |", "|---|---|---|---|"]
    lines += [f"| {g} | {_fmt(v['accuracy'])} | {_fmt(v.get('mean_margin'))} | {v['n']} |"
              for g, v in metrics["per_group"].items()]
    lines += ["", "| user | seen | group | accuracy | mean margin | n | mean response words |",
              "|---|---|---|---|---|---|---|"]
    for u, v in metrics["per_user"].items():
        lines.append(f"| {u} | {v['seen']} | {v['group']} | {_fmt(v['accuracy'])} | {_fmt(v.get('mean_margin'))} | "
                     f"{v['n']} | {_fmt(v.get('mean_response_words'), 1)} |")
    if gen:
        lines += ["", "Greedy response length (words) per user, generic user and reference:", "",
                  "| user | words |", "|---|---|"]
        lines += [f"| {u} | {w:.1f} |" for u, w in gen["users"].items()]
    weights = metrics.get("cluster_weights")
    if weights:
        k = len(next(iter(weights.values())))
        groups = {u: v["group"] for u, v in metrics["per_user"].items()}
        lines += ["", "Cluster weights per user (w_i = softmax(a_i) over the centres; learned without the groups):", "",
                  "| user | group | " + " | ".join(f"centre {j + 1}" for j in range(k)) + " |",
                  "|---|---|" + "---|" * k]
        lines += [f"| {u} | {groups.get(u) or '-'} | " + " | ".join(f"{x:.2f}" for x in w) + " |"
                  for u, w in weights.items()]
    lines += [""] + [f"![{p.stem}](plots/{p.name})" for p in pngs]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__,
                                     epilog=help_text("evaluate"), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="finished run folder (any route)")
    parser.add_argument("--data", required=True, help="comparison file (contract record)")
    parser.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = parser.parse_args(argv)
    from pipelines._cli import setup_logging

    setup_logging()
    try:
        m = evaluate_run(args.run, args.data, args.out, args.overrides)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"overall": m["overall"], "per_group": m["per_group"], "generic": m["generic"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
