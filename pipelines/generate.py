"""`python -m pipelines.generate --run RUN_DIR --user-id U (--prompt TEXT | --prompts FILE.jsonl --out FILE.jsonl)
[--user-text TEXT] [--max-new-tokens N --temperature T --top-p P --seed S]`

Answers prompts as a given user with a finished policy run (SFT, P-DPO, vanilla DPO, PPO), in batches where every
row has its own user prefix. `--prompt` prints one answer; `--prompts` reads JSONL (one object per line with a
"prompt"; contract records work) and writes one line per prompt to `--out`:

    {"prompt", "user_id", "personalized", "response", "tokens", "finished"}

`--per-row-users` takes each line's own "user_id" / "user_text" (falling back to --user-id / --user-text), so one
file can hold many users. An unseen user is answered as the generic user 0 ("personalized": false). Greedy by
default (`--temperature 0`); a temperature > 0 samples, reproducibly with `--seed`. A PPO run is decoded with its
rollouts' EOS rule (ppo.min_new_tokens), an SFT run without a user prefix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.config import ConfigError
from preference_data import DataError


def read_prompts(path: Path) -> list[dict]:
    """Rows {"prompt", "user_id"?, "user_text"?} of a JSONL file; errors name the line and field."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise DataError(f"{path}:{n}: expected an object with a non-empty string field 'prompt'")
        for key in ("user_id", "user_text"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise DataError(f"{path}:{n}: field '{key}' must be a string or null")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="finished policy run folder")
    p.add_argument("--user-id", required=True, help="the user to answer as (unseen: the generic user 0)")
    p.add_argument("--user-text", default=None, help="the user's text (runs with user_model.use_text=true)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; its answer is printed")
    src.add_argument("--prompts", help="JSONL file of {\"prompt\": ...} lines (needs --out)")
    p.add_argument("--out", help="JSONL output for --prompts")
    p.add_argument("--per-row-users", action="store_true",
                   help="--prompts: use each line's own user_id / user_text when it has one")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together (default 16)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the run's train.device)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines._cli import setup_logging

    setup_logging()
    try:
        if args.prompts and not args.out:
            raise ValueError("--prompts needs --out FILE.jsonl")
        if args.max_new_tokens < 1 or args.batch_size < 1:
            raise ValueError("--max-new-tokens and --batch-size must be >= 1")
        if args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
        rows = [{"prompt": args.prompt}] if args.prompt is not None else read_prompts(Path(args.prompts))
        users, texts = [], []
        for r in rows:
            own = args.per_row_users and r.get("user_id") is not None
            users.append(r["user_id"] if own else args.user_id)
            texts.append(r.get("user_text") if args.per_row_users and r.get("user_text") is not None
                         else args.user_text)

        from policy.loading import generate_texts, load_policy_run

        run = load_policy_run(args.run, args.device)
        out = generate_texts(run, [r["prompt"] for r in rows], users, texts, max_new_tokens=args.max_new_tokens,
                             do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p,
                             seed=args.seed, batch_size=args.batch_size)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"generate: error: {exc}", file=sys.stderr)
        return 2
    if args.prompt is not None:
        print(out[0].text)
        return 0
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        use_text = run.uses_prefix and run.cfg.user_model.use_text
        for r, u, t, g in zip(rows, users, texts, out):
            personalized = (run.personalized and run.knows(u)) or (use_text and bool(t))
            fh.write(json.dumps({"prompt": r["prompt"], "user_id": u, "personalized": personalized,
                                 "response": g.text, "tokens": len(g.token_ids), "finished": g.finished}) + "\n")
    tmp.replace(path)
    print(f"wrote {len(out)} answers to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
