"""`python experiments/decode_speed.py SFT_RUN [--dtype float32] [--reps 2]`: `PersonalizedPolicy.generate` through
transformers' `generate` against `policy.decoding.decode` (finished rows leave the batch; inverse-CDF sampling), on
a PPO rollout's shape: 10 demo prompts x 4 samples = 40 rows, 10 users, up to 96 new tokens, greedy and sampled at
T = 0.7, starting from a pi_SFT run of the demo (its merged adapter and 8-token soft prompt). Prints seconds, tokens
and, for greedy decoding, how many of the 40 answers the two decoders agree on."""

import argparse
import time

import torch

import policy.model as policy_model
from bench.common import BenchArgs, bench_config, run_tmpdir
from bench.rollout import _policy
from common.batching import PairEncoder
from preference_data.length_conflict import load_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sft_run")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    a = BenchArgs(name="ppo_rollout", model="smollm2-135m", dtype=args.dtype, batch=40, max_new_tokens=96)
    with run_tmpdir("decode") as tmp:
        cfg = bench_config(a, tmp, {"user_model.kind": "individual", "user_model.n_tokens": 8,
                                    "model.lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                    "model.sft_run": args.sft_run, "model.system_prompt": "Be helpful."})
        policy, tok, _ = _policy(a, cfg)
        enc = PairEncoder.from_config(tok, cfg)
        prompts = [enc.prompt_ids(item["prompt"]) for item in load_corpus()[:10] for _ in range(4)]
        users = torch.tensor([1 + (i // 4) % 10 for i in range(40)])
        kw = dict(pad_id=tok.pad_token_id, max_new_tokens=96, eos_token_id=tok.eos_token_id)
        compacting = policy_model.plain_decoding
        for rep in range(args.reps):
            greedy = {}
            for name, how in (("greedy", dict(do_sample=False)),
                              ("sampled T=0.7", dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0))):
                for impl in ("transformers", "policy.decoding"):
                    policy_model.plain_decoding = (lambda *_: None) if impl == "transformers" else compacting
                    torch.manual_seed(0)
                    t0 = time.time()
                    out = policy.generate(prompts, users, **kw, **how)
                    secs = time.time() - t0
                    n = sum(map(len, out))
                    print(f"rep {rep} {args.dtype} {name:14s} {impl:16s} {secs:6.2f} s  {n} tokens "
                          f"({n / secs:.0f}/s)", flush=True)
                    if name == "greedy":
                        greedy[impl] = out
            policy_model.plain_decoding = compacting
            same = sum(x == y for x, y in zip(greedy["transformers"], greedy["policy.decoding"]))
            print(f"rep {rep}: greedy answers equal in {same} of 40 rows")


if __name__ == "__main__":
    main()
