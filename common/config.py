"""Typed, validated run configuration.

One schema serves every stage (`train_rm`, `train_pdpo`, `train_ppo`, `evaluate`), so a key means the same thing
everywhere and `--help` lists the same table. YAML files are merged with dotted `key=value` overrides and checked
before any model is loaded: an unknown key names the nearest valid one, a wrong type names the key and the type.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """Invalid configuration. Raised before any model or data is loaded."""


def _f(default: Any, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name: str = _f("tiny-random", "`smollm2-135m` (embedded GGUF), `tiny-random` (tests), a local folder or a hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "storage dtype of the LLM's weights. auto: train.dtype's for a LoRA or frozen LLM (its weights never "
        "change), float32 for a full fine-tune (master weights; autocast computes in train.dtype)")
    finetune: Literal["lora", "full", "frozen"] = _f(
        "lora", "how the LLM is trained: LoRA adapters, full fine-tune, or frozen (only user model + head learn)")
    attn_implementation: Literal["auto", "sdpa", "eager"] = _f(
        "auto", "the LLM's attention kernel (transformers' attn_implementation). sdpa: PyTorch's fused kernel. eager: "
        "plain matrix products and a softmax, at O(length^2) memory per head. auto: eager where train.dtype "
        "resolves to bfloat16 on a CPU (the fused kernel's bf16 backward made a DPO step 1.6x slower on a Xeon "
        "with AMX), sdpa elsewhere (in float32 eager was 1.16x slower there; bench/RESULTS.md)")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA scaling numerator")
    lora_dropout: float = _f(0.0, "LoRA dropout in RM, SFT and DPO training (PPO keeps it off: its ratios "
                                  "compare the policy that sampled)")
    lora_target_modules: list = _f(["q_proj", "v_proj"], "module names that get LoRA adapters")
    trust_remote_code: bool = _f(False, "allow a hub model's own code to run (off unless you ask for it)")
    revision: Optional[str] = _f(None, "hub revision (branch, tag or commit) for a hub id")
    chat_template: Literal["auto", "none"] = _f(
        "auto", "`auto` wraps prompts in the tokenizer's chat template when it has one; `none` uses raw text")
    system_prompt: Optional[str] = _f(
        "You are a helpful assistant.", "system message of the chat template (null: the template's default)")
    reward_pooling: Literal["last", "sum", "last_sum", "sum_validity"] = _f(
        "last", "reward models only: `last` reads the score head at the answer's last token (its EOS); `sum` adds "
        "the head's score of every answer token, / 64 (a reward additive over the answer, like DPO's implicit "
        "reward: it extrapolates to answers longer than training's, where `last` is only trained up to their length); "
        "`last_sum` is both, with a head output of its own for each (the last token can penalise a broken answer "
        "strongly, which a sum of /64 terms cannot); `sum_validity` is `sum` + log sigmoid(last-token output), a "
        "penalty <= 0 for a broken answer that cannot reward a length of its own")
    sft_run: Optional[str] = _f(
        None, "finished train_sft run: its LoRA adapter is merged into the base weights before this stage's own "
        "LoRA, so the reference policy pi_SFT is that model")


@dataclass
class DataConfig:
    train_path: Optional[str] = _f(None, "training comparisons (.jsonl/.json/.parquet, contract record)")
    eval_path: Optional[str] = _f(None, "held-out comparisons used for eval during training and by `evaluate`")
    max_prompt_length: int = _f(128, "prompt tokens (after the chat template) kept per example")
    max_response_length: int = _f(96, "response tokens kept per example (longer responses are truncated)")
    max_user_text_length: int = _f(48, "tokens of user text kept for the explicit user model")
    prompt_overflow: Literal["truncate", "error"] = _f(
        "truncate", "prompts longer than max_prompt_length: keep the end and count them, or fail")
    on_error: Literal["raise", "skip"] = _f("raise", "bad records: fail naming file and line, or skip and count")
    max_train_records: Optional[int] = _f(None, "use only the first N training records (quick runs)")
    max_eval_records: Optional[int] = _f(None, "use only the first N held-out records")
    sft_responses: Literal["chosen", "both"] = _f(
        "chosen", "train_sft: imitate the chosen response of every record, or both responses")
    degenerate_negatives: float = _f(
        0.0, "train_rm: add this share of extra training pairs (same prompt and user, chosen answer against an "
        "empty answer, one token repeated, a two-token loop, its own tokens shuffled, or its opening followed by a "
        "span of it over and over) so that the RM ranks a broken answer below a real one for every user and PPO "
        "cannot collect reward with one")


@dataclass
class UserModelConfig:
    kind: Literal["uniform", "individual", "cluster"] = _f(
        "individual", "implicit user model: uniform (vanilla), individual (e_0 + o_i), cluster (V . w_i)")
    n_tokens: int = _f(4, "T_u, soft-prompt tokens of the implicit user embedding")
    n_clusters: int = _f(4, "K, cluster centres of the cluster user model")
    init_std: float = _f(0.02, "std of the cluster centres' random init, relative to token embeddings "
                               "(individual offsets start at 0: every user starts as the generic user)")
    use_text: bool = _f(False, "append the explicit user model: the LLM's own embeddings of the record's user_text")
    lr: Optional[float] = _f(None, "learning rate of the user model (default: 10 x train.lr)")
    shared_lr: Optional[float] = _f(
        None, "learning rate of the user model's parts shared by all users (e_0 of individual, the centres of "
        "cluster, the one embedding of uniform); default: user_model.lr. Lower it when one group's signal must not "
        "drag every user along (PPO: the majority's samples all push e_0)")
    dropout_to_generic: float = _f(0.0, "probability of replacing a seen user by the generic user in training")
    sparse: bool = _f(False, "sparse gradients for the user table with a row-wise AdaGrad: a step touches only the "
                      "batch's rows and keeps one state float per user (for very many users; not with DeepSpeed)")
    table_optimizer: Literal["lazy_adamw", "adamw"] = _f(
        "lazy_adamw", "optimizer of the per-user table (o_i, cluster logits a_i) when not sparse: lazy_adamw moves "
        "only the rows of the batch's users (an element with a zero gradient keeps its value, moments and step "
        "count); adamw is dense AdamW, under which absent users keep moving on stale moments (the old behaviour)")


@dataclass
class LossConfig:
    alpha: float = _f(0.5, "weight of the user-specific term; 1 - alpha on the same pair as generic user 0")
    beta: float = _f(0.1, "DPO temperature: implicit reward = beta * log pi(y|x,u) / pi_ref(y|x)")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = _f("sigmoid", "preference loss of P-DPO (the RM is always BT)")
    estimator: Literal["exact", "stochastic"] = _f(
        "exact", "exact: both terms every pair; stochastic: per pair the generic user with prob. 1 - alpha "
        "(one pass per pair, same expected loss)")
    label_smoothing: float = _f(0.0, "conservative DPO / BT label smoothing")
    nll_weight: float = _f(0.0, "P-DPO: weight of the per-token NLL of the chosen answer, added to each term with "
                           "that term's user (RPO; TRL's rpo_alpha). Keeps a user's own chosen answers likely, "
                           "so that the user prefix cannot win the DPO margin by making every answer unlikely")
    center_rewards_coef: float = _f(0.0, "RM: penalty on (r_w + r_l)^2 keeping rewards centred")


@dataclass
class TrainConfig:
    max_steps: int = _f(100, "optimizer steps")
    batch_size: int = _f(8, "comparisons (pairs) per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-4, "learning rate of LLM adapters and heads")
    optimizer: Literal["adamw", "sgd"] = _f(
        "adamw", "adamw (user tables: see user_model.table_optimizer) or plain SGD without momentum for every "
        "parameter (its update is linear in the gradient: used to check that process layouts give the same steps)")
    weight_decay: float = _f(0.0, "AdamW weight decay (never applied to the user model)")
    warmup_steps: int = _f(0, "linear warm-up steps")
    lr_scheduler: Literal["constant", "linear", "cosine"] = _f("constant", "schedule after warm-up")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 disables)")
    log_every: int = _f(5, "log training metrics every N steps")
    eval_every: int = _f(0, "evaluate on data.eval_path every N steps (0: only at the end)")
    early_stopping_patience: int = _f(
        0, "train_rm / train_pdpo: stop when the held-out loss (the training objective on data.eval_path, every "
        "train.eval_every steps) has not improved for this many evaluations, and keep the weights of the best one "
        "(0: off; train.max_steps is then the budget, not the plan)")
    early_stopping_min_delta: float = _f(0.0, "smallest decrease of the held-out loss that counts as improving")
    save_every: int = _f(0, "write a resumable checkpoint every N steps (0: never)")
    keep_last: int = _f(2, "resumable checkpoints kept (older ones pruned)")
    resume: Literal["auto", "never"] = _f("auto", "auto: continue from the newest complete checkpoint")
    deepspeed: Optional[str] = _f(None, "DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); null: plain torch")
    device: str = _f("auto", "`auto` (cuda if available), `cpu` or `cuda`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "compute dtype of the LLM (with model.dtype=auto also its storage). auto: bfloat16 where the device "
        "has native bf16 matrix instructions (CPU: AVX512-BF16 or AMX; GPU: bf16 support), else float32. What is "
        "trained stays float32 (LoRA, user model, heads)")
    eval_batch_size: int = _f(16, "pairs per batch when scoring held-out data")
    num_threads: int = _f(0, "torch CPU threads (0: torch default)")


@dataclass
class PPOConfig:
    rm_run: Optional[str] = _f(None, "run folder of a finished train_rm run (the frozen reward model)")
    rollout_batch_size: int = _f(16, "(prompt, user) samples generated per PPO iteration")
    minibatch_size: int = _f(8, "samples per PPO gradient step")
    ppo_epochs: int = _f(2, "passes over each rollout batch")
    generic_user_share: float = _f(0.2, "share of rollout samples generated for the generic user 0")
    init_user_model: Literal["fresh", "rm", "rm_gated", "rm_clusters"] = _f(
        "fresh", "start of the actor's user model: fresh (every user at the generic embedding, as in train_rm); "
        "rm_clusters (user_model.kind=cluster: the RM's users grouped by the directions of their trained rows, "
        "spherical k-means with K = user_model.n_clusters, and each user's cluster logit set to "
        "ppo.init_cluster_logit for its group's centre; the centres, all at pi_SFT's prompt, make the actor start "
        "exactly at pi_SFT; any RM user model but uniform); rm_gated (each user's offset is the RM's trained row "
        "times a learned scalar gate that starts at 0: the actor starts exactly at pi_SFT and PPO learns one number "
        "per user along the direction the RM found for that user; individual user models); or rm (the RM's trained "
        "per-user parameters, o_i or the cluster logits a_i, times ppo.init_user_model_scale: the actor no longer "
        "starts at pi_SFT). rm and rm_gated need the same user_model.kind and n_tokens as the RM run")
    init_cluster_logit: float = _f(
        3.0, "with ppo.init_user_model=rm_clusters: a user's starting logit for its own group's centre (the others "
        "0). 3.0 puts 0.95 of the weight on it with K = 2: firm enough that a few noisy rollouts do not move a user "
        "to the other group, and the logits still learn")
    init_user_model_scale: float = _f(
        0.3, "with ppo.init_user_model=rm: factor on the copied per-user parameters. The RM's embeddings are tuned "
        "for the RM's LoRA; at full size they derail the actor's generation (sequence KL ~30 at the first rollout "
        "in the demo), scaled down they keep their directions")
    user_sampling: Literal["random", "cycle", "group_balanced"] = _f(
        "random", "how the seen users of a rollout batch are drawn: random (uniform, independently), cycle (walk "
        "through a fresh random order of all seen users, batch after batch, so that every user gets the same number "
        "of samples within one pass; a small group is never left out of a batch by chance) or group_balanced (the "
        "user groups of the training data's `group` field take turns, each cycling through its own users: every "
        "group gets the same share of the samples however few users it has; users without a group form one group)")
    max_new_tokens: int = _f(48, "generation length limit")
    min_new_tokens: int = _f(1, "EOS is ruled out until a response has this many tokens (as OpenRLHF's generate), in "
                             "sampling, in the actor's and reference's log-probs (so ratios and KL are those of the "
                             "distribution sampled) and in evaluate's greedy decoding of the PPO policy. An RM trained "
                             "on real short and long answers scores an empty answer as the shortest of all: with 0, "
                             "a user who prefers short answers learns to say nothing")
    temperature: float = _f(1.0, "sampling temperature")
    top_k: int = _f(0, "top-k sampling (0: off)")
    top_p: float = _f(1.0, "nucleus sampling")
    kl_coef: float = _f(0.05, "per-token KL penalty coefficient against the reference")
    adaptive_kl: bool = _f(False, "adapt kl_coef towards target_kl (Ziegler et al.)")
    target_kl: float = _f(6.0, "target sequence KL of the adaptive controller")
    kl_horizon: int = _f(10000, "horizon of the adaptive KL controller")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    clip_range: float = _f(0.2, "policy ratio clip")
    loss_aggregation: Literal["token", "sequence"] = _f(
        "token", "how the clipped surrogate averages: token (every real token of the minibatch weighs the same, as "
        "TRL and OpenRLHF) or sequence (each sample's token mean, then the samples: a short answer's few tokens, its "
        "EOS among them, weigh as much as a long answer's many, which is where a length preference is decided)")
    clip_range_value: float = _f(0.2, "value clip")
    vf_coef: float = _f(0.5, "value loss weight")
    whiten_advantages: Optional[bool] = _f(
        None, "whiten advantages over the rollout batch (token-level mean and std); null: on for gae (as TRL's PPO), "
        "off for rloo (as TRL's RLOO and OpenRLHF: the leave-one-out baseline is the only normalisation, and a "
        "token-weighted batch mean would be set by the long answers, mostly the majority's)")
    missing_eos_penalty: Optional[float] = _f(None, "reward penalty for responses that hit max_new_tokens without EOS")
    repeated_ngram_penalty: float = _f(
        0.0, "subtracted from each response's score times the share of its n-grams (ppo.repeated_ngram_size) that "
        "repeat an earlier one of the same response (Yeo et al. 2025): a loop pays, a real answer (about 0.1 % of its "
        "3-grams repeated in the demo's data) does not. For an RM that pays every real-looking token, so that a "
        "policy lengthens its answers by going round in circles; 0: off")
    repeated_ngram_size: int = _f(3, "n of ppo.repeated_ngram_penalty's n-grams (tokens)")
    greedy_in_group: bool = _f(
        False, "the first sample of each (prompt, user) group is the actor's greedy answer, the others sampled "
        "(ReMax, Li et al. 2024, decodes a greedy answer as its baseline; here it is also scored and trained on, "
        "its advantage against its sampled siblings): people are shown greedy answers, and a loop that only greedy "
        "decoding falls into is then scored and paid for (ppo.repeated_ngram_penalty). Needs ppo.samples_per_prompt "
        ">= 3, so that the greedy answer has sampled siblings to be judged against, and the plain sampler (ppo.top_k "
        "0, ppo.top_p 1.0), which decodes greedy and sampled rows in one batch")
    overlong_buffer: int = _f(
        0, "soft overlong punishment (DAPO, Yu et al. 2025): a response longer than ppo.max_new_tokens - "
        "overlong_buffer tokens pays ppo.overlong_penalty times the share of the buffer it uses, a linear ramp up "
        "to ppo.max_new_tokens. Set the ramp's start past the training data's longest answer: a reward model "
        "extrapolates there (a grade that rises with length keeps rising), and the ramp brakes only that tail, "
        "whichever the user; 0: off")
    overlong_penalty: float = _f(1.0, "what the soft overlong ramp (ppo.overlong_buffer) costs at ppo.max_new_tokens, "
                                 "in reward units (on top of ppo.missing_eos_penalty for an answer without EOS)")
    reward_reference: Literal["none", "sft_greedy"] = _f(
        "none", "none: a sample's score is the RM's r(x, y, u); sft_greedy: the RM's Bradley-Terry probability that "
        "the user prefers the sample to pi_SFT's greedy answer to the same prompt, sigmoid(r(x, y, u) - r(x, y_SFT, "
        "u)) (preference as reward, Fu et al. 2025): bounded, so an answer already clearly preferred to pi_SFT's "
        "gains little by growing further, where a summed grade pays for every added sentence. y_SFT is decoded once "
        "per prompt (adapters off, the reference prefix, ppo.max_new_tokens) and scored once per (prompt, user); "
        "scores then lie in (0, 1), which sets the scale of ppo.kl_coef and the penalties")
    critic: Literal["shared", "separate"] = _f("shared", "value head on the actor backbone, or a separate LoRA critic")
    reward_clip: float = _f(10.0, "clip RM scores to [-c, c]")
    normalize_reward: bool = _f(False, "standardise RM scores before the advantage (how: ppo.reward_baseline). Off "
                                "by default: with rloo the leave-one-out baseline already removes each (prompt, "
                                "user)'s offset, and scaling per user on top reweights users by the RM's certainty")
    reward_baseline: Literal["per_user", "group", "global"] = _f(
        "per_user", "per_user: centre each user's scores on that user's running mean (a BT reward is defined only "
        "up to a per-user shift) and scale by the running std; group: centre on the other samples of the same "
        "(prompt, user) (RLOO; needs ppo.samples_per_prompt >= 2); global: the first rollout's mean and std")
    samples_per_prompt: int = _f(1, "responses sampled per (prompt, user) pair in a rollout batch")
    advantage_estimator: Literal["gae", "rloo"] = _f(
        "gae", "gae: per-token GAE with the critic's values; rloo: critic-free REINFORCE leave-one-out (Ahmadian et "
        "al. 2024): each sample's KL-penalised sequence reward minus the mean of the other samples of its "
        "(prompt, user) group, on every token (needs ppo.samples_per_prompt >= 2; the critic is not trained)")


@dataclass
class EvalConfig:
    n_generation_prompts: int = _f(8, "held-out prompts generated per user for response-length statistics")
    max_new_tokens: int = _f(64, "greedy generation length limit in evaluation")
    generation_users: int = _f(0, "seen users generated for (0: all)")
    max_response_length: Optional[int] = _f(
        None, "held-out responses are scored whole (null: up to the model's context, whatever data.max_response_length "
        "the run trained with); N truncates them to N tokens, and metrics.json says so (`scoring`)")


@dataclass
class WandbConfig:
    project: str = _f("p-rlhf", "wandb project")
    group: Optional[str] = _f(None, "wandb group: every stage of one experiment shares it")
    mode: Literal["offline", "online", "disabled"] = _f("offline", "offline writes to run_dir/wandb; `wandb sync` later")
    name: Optional[str] = _f(None, "wandb run name (default: stage + output folder name)")


@dataclass
class Config:
    output_dir: str = _f("runs/default", "run folder (contract layout)")
    seed: int = _f(0, "seed of every random choice (init, data order, sampling)")
    report_to: Literal["wandb", "none"] = _f("wandb", "metrics logging backend")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    user_model: UserModelConfig = field(default_factory=UserModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ---------------------------------------------------------------------------------------------- parsing


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_keys(cls=Config, prefix: str = ""):
    """(dotted key, type, default, help) for every leaf key of the schema."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield prefix + f.name, tp, default, f.metadata.get("help", "")


def get_key(cfg: Config, key: str) -> Any:
    """The value of a dotted key, e.g. get_key(cfg, "train.lr")."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def all_keys() -> list[str]:
    sections = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(_hints(Config)[f.name])]
    return [k for k, *_ in iter_keys()] + sections


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(key: str, value: Any, tp, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}' must be an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: key '{key}' must be a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: key '{key}' must be a string, got {type(value).__name__} {value!r}")
    if tp is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{source}: key '{key}' must be a list, got {type(value).__name__} {value!r}")
    return value


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    if not close:  # a typo in the last part only, e.g. `train.max_step`
        close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint} (see --help for every key)")


def _build(cls, data: dict, source: str, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise _unknown(full, source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, source, full + ".")  # `train:` alone: defaults
        else:
            kwargs[key] = _coerce(full, value, tp, source)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `key=value` overrides, type-check and validate. Raises ConfigError."""
    tree: dict = {}
    source = "config"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping of config keys")
        source = str(p)
    cfg = _build(Config, tree, source)
    for text in overrides or []:
        key, value = parse_override(text)
        if key in all_keys() and key not in [k for k, *_ in iter_keys()]:
            raise ConfigError(f"override '{text}': '{key}' is a section; set one of its keys ({key}.KEY=value)")
        if key not in [k for k, *_ in iter_keys()]:
            raise _unknown(key, "command line")
        merged = to_dict(cfg)
        _set_dotted(merged, key, value)
        cfg = _build(Config, merged, "command line")
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def validate(cfg: Config) -> None:
    """Range checks that types cannot express. Raises ConfigError naming the key."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}' {msg}")

    um, loss, tr, d, ppo = cfg.user_model, cfg.loss, cfg.train, cfg.data, cfg.ppo
    for key, *_ in iter_keys():  # YAML reads .inf and .nan as floats
        value = get_key(cfg, key)
        need(not isinstance(value, float) or math.isfinite(value), key, f"must be a finite number, got {value}")
    m = cfg.model
    need(m.lora_r > 0, "model.lora_r", f"must be > 0, got {m.lora_r}")
    need(m.lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {m.lora_alpha}")
    need(0.0 <= m.lora_dropout < 1.0, "model.lora_dropout", f"must be in [0, 1), got {m.lora_dropout}")
    need(d.max_user_text_length >= 0, "data.max_user_text_length", "must be >= 0 (0: no user text tokens)")
    for key in ("max_train_records", "max_eval_records"):
        n = getattr(d, key)
        need(n is None or n > 0, f"data.{key}", f"must be > 0 or null (all records), got {n}")
    need(um.n_tokens > 0, "user_model.n_tokens", f"(T_u) must be > 0, got {um.n_tokens}")
    need(um.n_clusters > 0, "user_model.n_clusters", f"(K) must be > 0, got {um.n_clusters}")
    need(um.init_std >= 0, "user_model.init_std", "must be >= 0")
    need(0.0 <= um.dropout_to_generic < 1.0, "user_model.dropout_to_generic", "must be in [0, 1)")
    need(um.lr is None or um.lr > 0, "user_model.lr", "must be > 0")
    need(um.shared_lr is None or um.shared_lr >= 0, "user_model.shared_lr", "must be >= 0 (0 freezes them)")
    need(not (um.sparse and tr.deepspeed), "user_model.sparse", "cannot be combined with train.deepspeed (DeepSpeed "
         "optimizers take dense gradients only)")
    need(0.0 <= loss.alpha <= 1.0, "loss.alpha", f"must be in [0, 1], got {loss.alpha}")
    need(loss.beta > 0, "loss.beta", f"must be > 0, got {loss.beta}")
    need(0.0 <= loss.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)")
    need(loss.nll_weight >= 0.0, "loss.nll_weight", "must be >= 0")
    need(loss.center_rewards_coef >= 0.0, "loss.center_rewards_coef", "must be >= 0")
    need(0.0 <= d.degenerate_negatives <= 1.0, "data.degenerate_negatives", "must be in [0, 1]")
    need(tr.max_steps > 0, "train.max_steps", "must be > 0")
    need(tr.batch_size > 0, "train.batch_size", "must be > 0")
    need(tr.grad_accum > 0, "train.grad_accum", "must be > 0")
    need(tr.lr > 0, "train.lr", "must be > 0")
    need(tr.save_every >= 0, "train.save_every", "must be >= 0")
    need(tr.keep_last >= 1, "train.keep_last", "must be >= 1")
    need(tr.log_every > 0, "train.log_every", "must be > 0")
    need(tr.eval_every >= 0, "train.eval_every", "must be >= 0 (0: at the end only)")
    need(tr.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0 (0: off)")
    need(tr.early_stopping_min_delta >= 0, "train.early_stopping_min_delta", "must be >= 0")
    need(tr.early_stopping_patience == 0 or (tr.eval_every > 0 and d.eval_path), "train.early_stopping_patience",
         "needs train.eval_every > 0 and data.eval_path (it stops on the held-out loss)")
    need(tr.eval_batch_size > 0, "train.eval_batch_size", "must be > 0")
    need(tr.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(tr.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(tr.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0: no clipping)")
    need(tr.num_threads >= 0, "train.num_threads", "must be >= 0 (0: torch's default)")
    if tr.warmup_steps >= tr.max_steps > 0:
        log.warning("train.warmup_steps=%d >= train.max_steps=%d: the learning rate never reaches train.lr",
                    tr.warmup_steps, tr.max_steps)
    need(tr.device in ("auto", "cpu", "cuda") or tr.device.startswith("cuda:"), "train.device",
         "must be auto, cpu or cuda[:N]")
    if tr.deepspeed is not None:
        need(Path(tr.deepspeed).exists(), "train.deepspeed", f"names a file that does not exist: {tr.deepspeed}")
    need(d.max_prompt_length > 0, "data.max_prompt_length", "must be > 0")
    need(d.max_response_length > 0, "data.max_response_length", "must be > 0")
    need(0.0 <= ppo.generic_user_share <= 1.0, "ppo.generic_user_share", "must be in [0, 1]")
    need(ppo.rollout_batch_size > 0, "ppo.rollout_batch_size", "must be > 0")
    need(ppo.minibatch_size > 0 and ppo.rollout_batch_size % ppo.minibatch_size == 0, "ppo.minibatch_size",
         "must be > 0 and divide ppo.rollout_batch_size")
    need(ppo.ppo_epochs > 0, "ppo.ppo_epochs", "must be > 0")
    need(ppo.top_k >= 0, "ppo.top_k", "must be >= 0 (0: off)")
    need(ppo.clip_range > 0 and ppo.clip_range_value > 0, "ppo.clip_range", "and ppo.clip_range_value must be > 0")
    need(ppo.vf_coef >= 0, "ppo.vf_coef", "must be >= 0")
    need(ppo.kl_horizon > 0, "ppo.kl_horizon", "must be > 0")
    need(ppo.target_kl > 0, "ppo.target_kl", "must be > 0")
    need(ppo.reward_clip > 0, "ppo.reward_clip", "must be > 0")
    need(ppo.repeated_ngram_penalty >= 0, "ppo.repeated_ngram_penalty", "must be >= 0")
    need(ppo.repeated_ngram_size >= 1, "ppo.repeated_ngram_size", "must be >= 1")
    need(not ppo.greedy_in_group or ppo.samples_per_prompt >= 3, "ppo.greedy_in_group",
         "needs ppo.samples_per_prompt >= 3 (a greedy answer and at least two sampled ones per group)")
    need(not ppo.greedy_in_group or (ppo.top_k == 0 and ppo.top_p == 1.0), "ppo.greedy_in_group",
         "decodes greedy and sampled rows in one batch with the plain sampler: set ppo.top_k=0 and ppo.top_p=1.0")
    need(0 <= ppo.overlong_buffer <= ppo.max_new_tokens, "ppo.overlong_buffer", "must be in [0, ppo.max_new_tokens]")
    need(ppo.overlong_penalty >= 0, "ppo.overlong_penalty", "must be >= 0 (it is subtracted)")
    need(ppo.missing_eos_penalty is None or ppo.missing_eos_penalty >= 0, "ppo.missing_eos_penalty",
         "must be >= 0 (it is subtracted) or null")
    e = cfg.eval
    need(e.n_generation_prompts >= 0, "eval.n_generation_prompts", "must be >= 0 (0: no generation)")
    need(e.max_new_tokens > 0, "eval.max_new_tokens", "must be > 0")
    need(e.generation_users >= 0, "eval.generation_users", "must be >= 0")
    need(e.max_response_length is None or e.max_response_length > 0, "eval.max_response_length",
         "must be > 0 or null (complete answers)")
    need(ppo.max_new_tokens > 0, "ppo.max_new_tokens", "must be > 0")
    need(0 <= ppo.min_new_tokens <= ppo.max_new_tokens, "ppo.min_new_tokens", "must be in [0, ppo.max_new_tokens]")
    need(ppo.samples_per_prompt >= 1 and ppo.rollout_batch_size % ppo.samples_per_prompt == 0,
         "ppo.samples_per_prompt", "must be >= 1 and divide ppo.rollout_batch_size")
    need(ppo.reward_baseline != "group" or ppo.samples_per_prompt >= 2, "ppo.reward_baseline",
         "'group' needs ppo.samples_per_prompt >= 2")
    need(ppo.advantage_estimator != "rloo" or ppo.samples_per_prompt >= 2, "ppo.advantage_estimator",
         "'rloo' needs ppo.samples_per_prompt >= 2")
    need(ppo.init_user_model_scale > 0, "ppo.init_user_model_scale", "must be > 0")
    need(ppo.init_cluster_logit > 0, "ppo.init_cluster_logit", "must be > 0")
    need(ppo.init_user_model != "rm_clusters" or cfg.user_model.kind == "cluster", "user_model.kind",
         "must be cluster with ppo.init_user_model=rm_clusters (it seeds the cluster weights)")
    need(ppo.temperature > 0, "ppo.temperature", "must be > 0")
    need(0 < ppo.top_p <= 1, "ppo.top_p", "must be in (0, 1]")
    need(ppo.kl_coef >= 0, "ppo.kl_coef", "must be >= 0")
    need(0 <= ppo.gamma <= 1 and 0 <= ppo.lam <= 1, "ppo.gamma", "and ppo.lam must be in [0, 1]")


def help_text(stage: str) -> str:
    source = "the run's config.yaml" if stage == "evaluate" else "YAML file via --config"
    lines = [f"Config keys ({source}, or dotted key=value overrides). Stage: {stage}", ""]
    for key, tp, default, help_ in iter_keys():
        lines.append(f"  {key:<34} {_type_name(tp):<28} default {default!r}")
        lines.append(f"      {help_}")
    return "\n".join(lines)


def config_reference_markdown() -> str:
    """The table in configs/README.md; a test keeps it in sync with the schema."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_ in iter_keys():
        rows.append(f"| `{key}` | {_type_name(tp).replace('|', 'or')} | `{default!r}` | {help_} |")
    return "\n".join(rows)
