"""`python -m pipelines.serve --run RUN_DIR [--host 127.0.0.1] [--port 8000] [--max-batch 16] [--max-new-tokens 256]
[--backend hf|vllm]`

Serves a finished run over an OpenAI-compatible HTTP API (FastAPI + uvicorn): a policy run (SFT, P-DPO, vanilla
DPO, PPO) on /v1/chat/completions and /v1/completions, each request decoded with its own user's soft prompt; a
reward-model run on /v1/rewards (best-of-n reranking per user). The user is OpenAI's `user` field or `user_id` /
`user_text` in the body; an unseen user gets the generic user 0 and the answer says so
(`"prlhf": {"personalized": false}`). POST /v1/users onboards a new user from a few comparisons while serving.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from common.config import ConfigError
from preference_data import DataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="finished run folder (policy or reward model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; the API has no authentication)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more are answered 429 (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="cap on a request's max_tokens, and its default (default 256)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default: the run's data.max_prompt_length)")
    p.add_argument("--max-n", type=int, default=8, help="most choices per request (default 8)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: the built-in batching engine (CPU or GPU); vllm: vLLM with prompt embeddings (GPU, "
                        "pip install 'p-rlhf[vllm]')")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the run's train.device)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: run folder name)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--onboard-steps", type=int, default=50, help="Adam steps when onboarding a user (default 50)")
    p.add_argument("--onboard-lr", type=float, default=0.05, help="learning rate when onboarding (default 0.05)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines._cli import setup_logging

    setup_logging()
    logging.getLogger().setLevel(args.log_level.upper())
    if args.max_batch < 1 or args.max_queue < 0 or args.max_new_tokens < 1 or args.max_n < 1:
        print("serve: error: --max-batch, --max-new-tokens and --max-n must be >= 1, --max-queue >= 0",
              file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from serving.app import create_app
    from serving.server import serve_forever
    from serving.service import load_service

    try:
        service = load_service(args.run, args.device, args.backend, args.max_batch, args.max_queue,
                               args.max_new_tokens, args.max_prompt_tokens, args.max_n, args.served_model_name,
                               args.onboard_steps, args.onboard_lr)
    except (ConfigError, DataError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("serving %s as %r (%s) on http://%s:%d/v1", args.run, service.model_id,
                                     service.route, args.host, args.port)
    serve_forever(create_app(service), args.host, args.port, args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
