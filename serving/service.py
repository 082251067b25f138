"""One served run: its model (a policy behind a decode backend, or a reward model), its users, prompts and limits.

`load_service(run_dir, ...)` reads the run folder: a policy run (train_sft, train_pdpo, train_ppo; vanilla DPO is a
P-DPO run with a uniform user model) is served for generation, a reward-model run (train_rm) for /v1/rewards.
`serving.app.create_app(service)` puts the HTTP API in front of it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.engine import AsyncStream, Engine, GenerationRequest
from serving.protocol import APIError, ChatMessage
from serving.sampling import SamplingParams
from serving.users import UserDirectory

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_new_tokens: int = 256  # cap on a request's max_tokens (and its default)
    max_prompt_tokens: int = 512  # longest prompt accepted, in tokens (after the chat template)
    max_n: int = 8  # choices per request


# --------------------------------------------------------------------------------------------------- prompts


def chat_prompt_ids(encoder, messages: list[ChatMessage]) -> list[int]:
    """Token ids of a conversation, laid out as training laid out a prompt (`PairEncoder.prompt_ids`): the run's
    chat template with a generation prompt, and the run's system prompt unless the request brings its own. A
    tokenizer without a chat template gets the messages' texts on lines of their own, as training did. Never
    truncated: the caller checks the length."""
    tok = encoder.tok
    if encoder.use_chat:
        convo = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
        if encoder.system_prompt and not any(m["role"] == "system" for m in convo):
            convo.insert(0, {"role": "system", "content": encoder.system_prompt})
        try:
            ids = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - jinja templates raise what they like (e.g. roles must alternate)
            raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tok("\n".join(m.text for m in messages) + "\n", add_special_tokens=False).input_ids


def completion_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A raw completion prompt: its tokens as they are, no template (OpenAI's /v1/completions)."""
    return tokenizer(prompt, add_special_tokens=False).input_ids


# --------------------------------------------------------------------------------------------------- service


class Service:
    """What the HTTP layer needs; built by `load_service`."""

    def __init__(self, run_dir: Path, model_id: str, info: dict, route: str, limits: Limits, users: UserDirectory,
                 encoder, engine: Engine | None = None, scorer=None, backend_name: str = "hf",
                 personalized: bool = False):
        self.run_dir, self.model_id, self.info, self.route = run_dir, model_id, info, route
        self.limits, self.users, self.encoder = limits, users, encoder
        self.engine, self.scorer = engine, scorer
        self.backend_name = backend_name
        self.personalized = personalized  # users can get different answers (scores) at all
        self.min_new_tokens = 0

    @property
    def is_policy(self) -> bool:
        return self.engine is not None

    @property
    def tokenizer(self):
        return self.encoder.tok

    def describe(self) -> dict:
        um = self.info.get("user_model", {})
        return {"route": self.route, "stage": self.info.get("stage"), "base_model": self.info.get("model_name"),
                "user_model": um.get("kind"), "n_users": len(self.users.vocab()), "personalized": self.personalized,
                "backend": self.backend_name if self.is_policy else None,
                "endpoints": ["/v1/chat/completions", "/v1/completions"] if self.is_policy else ["/v1/rewards"]}

    # -- checks shared by the endpoints

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    def require(self, policy: bool) -> None:
        if policy and not self.is_policy:
            raise APIError(400, f"{self.model_id!r} is a reward model ({self.info.get('stage')}): it scores answers "
                                "(POST /v1/rewards), it does not write them", code="wrong_model_type")
        if not policy and self.is_policy:
            raise APIError(400, f"{self.model_id!r} is a policy ({self.info.get('stage')}): /v1/rewards needs a "
                                "reward-model run (train_rm)", code="wrong_model_type")

    def check_prompt(self, ids: list[int], param: str) -> list[int]:
        limit = self.limits.max_prompt_tokens
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than this server's limit of {limit} "
                                "(max_prompt_tokens)", param=param, code="context_length_exceeded")
        return ids

    def sampling(self, body, max_new_tokens: int | None) -> tuple[SamplingParams, int]:
        cap = self.limits.max_new_tokens
        if max_new_tokens is not None and max_new_tokens > cap:
            raise APIError(400, f"max_tokens is {max_new_tokens}, more than this server's limit of {cap} "
                                "(max_new_tokens)", param="max_tokens", code="max_tokens_exceeded")
        if body.n > self.limits.max_n:
            raise APIError(400, f"n is {body.n}, more than this server's limit of {self.limits.max_n}", param="n")
        params = SamplingParams(max_tokens=max_new_tokens or cap,
                                temperature=1.0 if body.temperature is None else float(body.temperature),
                                top_p=1.0 if body.top_p is None else float(body.top_p), seed=body.seed,
                                stop=tuple(body.stop), min_tokens=self.min_new_tokens)
        return params, body.n

    def open(self, requests: list[GenerationRequest]) -> AsyncStream:
        from serving.engine import QueueFull

        try:
            return self.engine.open(requests)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def close(self) -> None:
        self.users.close()
        if self.engine is not None:
            self.engine.stop()


# --------------------------------------------------------------------------------------------------- loading


def _stage(run_dir: Path) -> dict:
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a finished run (no run.json)")
    return json.loads(info_path.read_text())


def _refuse_onboarding(route: str, kind: str | None) -> str | None:
    if route == "sft":
        return "this is an SFT run: it is user-agnostic (no user prefix), so there is no user row to fit"
    if kind == "uniform":
        return ("this run's user model is 'uniform' (vanilla RLHF): every user has the same embedding, so there is "
                "nothing user-specific to fit")
    return None


def load_service(run_dir: str | Path, device: str | None = None, backend: str = "hf", max_batch: int = 16,
                 max_queue: int = 64, max_new_tokens: int = 256, max_prompt_tokens: int | None = None,
                 max_n: int = 8, model_id: str | None = None, onboard_steps: int = 50,
                 onboard_lr: float = 0.05) -> Service:
    """Load a finished run for serving (see the module doc). `max_prompt_tokens` defaults to the run's
    data.max_prompt_length (the longest prompt it was trained on)."""
    from common.run import load_run_config, pick_device

    run_dir = Path(run_dir)
    info = _stage(run_dir)
    cfg = load_run_config(run_dir)
    device = torch.device(device) if device else pick_device(cfg)
    model_id = model_id or run_dir.resolve().name
    limits = Limits(max_new_tokens, max_prompt_tokens or int(cfg.data.max_prompt_length), max_n)
    kind = info.get("user_model", {}).get("kind")
    if info.get("stage") == "train_rm":
        from policy.ppo.roles import load_reward_role
        from serving.rewards import RewardScorer

        scorer = RewardScorer(load_reward_role(run_dir, device), max_queue=max_queue)
        users = UserDirectory(run_dir, lambda: scorer.vocab, scorer.reload_users, _refuse_onboarding("rm", kind),
                              str(device), onboard_steps, onboard_lr)
        return Service(run_dir, model_id, info, "rm", limits, users, scorer.encoder, scorer=scorer,
                       personalized=kind != "uniform")

    from policy.loading import load_policy_run
    from serving.policy import ServedPolicy

    run = load_policy_run(run_dir, device, cfg)
    served = ServedPolicy(run)
    if backend == "vllm":
        from serving.vllm_backend import VLLMEngine

        engine = VLLMEngine(served, max_batch=max_batch, max_queue=max_queue)
    elif backend == "hf":
        engine = Engine(served, max_batch=max_batch, max_queue=max_queue).start()
    else:
        raise ValueError(f"unknown backend {backend!r} (hf or vllm)")

    def reload_users(vocab, user_model):
        served.users = served.make_table(vocab, user_model)

    users = UserDirectory(run_dir, lambda: served.users.vocab, reload_users, _refuse_onboarding(run.route, kind),
                          str(device), onboard_steps, onboard_lr)
    svc = Service(run_dir, model_id, info, run.route, limits, users, run.encoder, engine=engine,
                  backend_name=backend, personalized=run.personalized)
    svc.min_new_tokens = run.min_new_tokens
    return svc
