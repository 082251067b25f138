"""The serving checks of issue 21 on the demo's P-DPO run, through the real `openai` client against the server.

    python experiments/check_serve_demo.py --run runs/demo_base/pdpo --data runs/demo_base/data/eval.jsonl
        [--train FILE] [--prompts 8] [--max-tokens 64] [--source-user user_5] [--steps 50] [--lr 0.05]
        [--work DIR] [--threads N] [--out FILE.json]

The run is served from a copy (`--work`, default RUN/../serve_check; hard links, the run itself is never written)
by `pipelines.serve`'s app under uvicorn on 127.0.0.1. Then, all through the `openai` client, greedy:

1. personalization: the first `--prompts` held-out prompts of DATA as user_5 (minority) and as user_1 (majority),
   sent concurrently. Pass: user_5's mean words <= 0.5 x user_1's. Also shown, not a pass criterion: whether the
   server's answers equal `generate_texts` (the project's own decoder) decoding the same two rows alone. In float32
   a near-tie can flip with the batch's composition (padding changes the last bits): `generate_texts` itself gave
   three different user_1 answers to one prompt decoded alone, in a batch of 2 and in a batch of 16;
2. load: 16 concurrent requests from the 10 users (user_1 .. user_10), mixed prompts. Pass: all 16 succeed;
3. onboarding: a new user from `--source-user`'s first 8 training comparisons (the short answer chosen), relabelled,
   POST /v1/users, wait for "fitted", then the held-out prompts as the new user and as the generic user (no user).
   Pass: the new user's answers are shorter than the generic user's.

Prints the numbers (and writes them, every answer included, to `--out`, default WORK/check_serve_demo.json).
CPU cost on SmolLM2-135M: a few minutes (the onboarding fit dominates).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True, help="held-out comparisons (their prompts are asked)")
    p.add_argument("--train", default=None, help="training comparisons (default: DATA's folder/train.jsonl)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--source-user", default="user_5")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--work", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import httpx
    import openai
    import torch

    from common.metrics import words
    from common.run_users import copy_run
    from policy.loading import generate_texts
    from preference_data import load_records
    from serving.app import create_app
    from serving.server import BackgroundServer
    from serving.service import load_service

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    work = Path(args.work) if args.work else run.parent / "serve_check"
    served = work / run.name
    if not served.exists():
        copy_run(run, served)
    held = list(dict.fromkeys(r.prompt for r in load_records(args.data)))[: args.prompts]
    train = load_records(args.train or Path(args.data).parent / "train.jsonl")
    mine = [r for r in train if r.user_id == args.source_user and r.prompt not in held][: args.k]
    comparisons = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in mine]
    new_user = f"new_{args.source_user}_like"
    out: dict = {"run": str(run), "served_copy": str(served), "prompts": held, "max_tokens": args.max_tokens}

    t0 = time.time()
    service = load_service(served, "cpu", max_batch=16, max_new_tokens=max(args.max_tokens, 64),
                           onboard_steps=args.steps, onboard_lr=args.lr)
    out["load_s"] = time.time() - t0
    with BackgroundServer(create_app(service), log_level="warning") as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=1800)

        def ask(prompt, user, max_tokens=args.max_tokens):
            kw = {"user": user} if user else {}
            r = client.chat.completions.create(model=service.model_id, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0, **kw)
            return {"prompt": prompt, "user": user, "answer": r.choices[0].message.content, "prlhf": r.prlhf,
                    "tokens": r.usage.completion_tokens}

        def ask_all(pairs, max_tokens=args.max_tokens):
            with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
                return list(pool.map(lambda pu: ask(pu[0], pu[1], max_tokens), pairs))

        # 1. personalization
        t0 = time.time()
        res = ask_all([(q, u) for u in ("user_5", "user_1") for q in held])
        out["personalization_s"] = time.time() - t0
        w5 = mean([words(r["answer"]) for r in res if r["user"] == "user_5"])
        w1 = mean([words(r["answer"]) for r in res if r["user"] == "user_1"])
        ref = generate_texts(service.engine.model.run, held[:2], ["user_5", "user_1"], max_new_tokens=args.max_tokens,
                             batch_size=1)
        same = [r["answer"].strip() == g.text for r, g in zip([res[0], res[len(held) + 1]], ref)]
        out["personalization"] = {"user_5_words": w5, "user_1_words": w1, "ratio": w5 / w1,
                                  "pass": w5 <= 0.5 * w1 and all(r["prlhf"]["personalized"] for r in res),
                                  "server_equals_generate_texts_alone": same, "answers": res}

        # 2. load: 16 concurrent requests from the 10 users
        t0 = time.time()
        pairs = [(held[i % len(held)], f"user_{i % 10 + 1}") for i in range(16)]
        try:
            load = ask_all(pairs, 32)
            ok = len(load) == 16 and all(r["answer"] is not None for r in load)
        except openai.OpenAIError as exc:
            load, ok = [str(exc)], False
        out["load"] = {"requests": 16, "users": 10, "all_succeeded": ok, "seconds": time.time() - t0,
                       "tokens": sum(r["tokens"] for r in load) if ok else None}

        # 3. onboarding
        t0 = time.time()
        r = httpx.post(srv.base_url + "/v1/users", json={"user_id": new_user, "comparisons": comparisons}, timeout=60)
        r.raise_for_status()
        while (status := httpx.get(f"{srv.base_url}/v1/users/{new_user}").json())["status"] == "pending":
            time.sleep(2)
        out["onboarding_s"] = time.time() - t0
        res = ask_all([(q, u) for u in (new_user, None) for q in held])
        wn = mean([words(r["answer"]) for r in res if r["user"] == new_user])
        wg = mean([words(r["answer"]) for r in res if r["user"] is None])
        out["onboarding"] = {"status": status, "k": len(comparisons), "source_user": args.source_user,
                             "new_user_words": wn, "generic_words": wg,
                             "pass": status["status"] == "fitted" and wn < wg
                             and all(r["prlhf"]["personalized"] for r in res if r["user"] == new_user),
                             "answers": res}

    dest = Path(args.out) if args.out else work / "check_serve_demo.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    pers, load, onb = out["personalization"], out["load"], out["onboarding"]
    print(f"1. user_5 {pers['user_5_words']:.1f} words vs user_1 {pers['user_1_words']:.1f} (ratio "
          f"{pers['ratio']:.2f}, need <= 0.5): {'PASS' if pers['pass'] else 'FAIL'}; server == generate_texts alone: "
          f"{pers['server_equals_generate_texts_alone']}")
    print(f"2. 16 concurrent requests from 10 users: {'PASS' if load['all_succeeded'] else 'FAIL'} "
          f"({load['seconds']:.1f} s, {load['tokens']} tokens)")
    print(f"3. onboarded {new_user} from {onb['k']} comparisons in {out['onboarding_s']:.0f} s ({onb['status']}): "
          f"{onb['new_user_words']:.1f} words vs generic {onb['generic_words']:.1f}: "
          f"{'PASS' if onb['pass'] else 'FAIL'}")
    print(f"wrote {dest}")
    return 0 if pers["pass"] and load["all_succeeded"] and onb["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
