"""The four roles of RLHF-PPO as separate, named objects.

- `Actor`: the personalized policy pi_P(y | x, u) (user prefix + LoRA): sampling and per-token log-probs.
- `Critic`: a value head nn.Linear(d, 1) read on the hidden states of [prefix, prompt, response], either on the
  actor's backbone (`ppo.critic=shared`: one forward serves both) or on a backbone of its own (`separate`: own
  LoRA, own user model).
- `Reference`: pi_SFT(y | x), the actor with adapters disabled and the user-agnostic reference prefix (the
  paper's reference; see `common.backbone.PersonalizedBackbone`).
- `Reward`: the frozen personalized reward model of a finished `train_rm` run, with *its own* user model, user
  vocabulary and tokenizer. A sample is scored for the user it was generated for, found by its source user id.

Per-token tensors are [B, W] over response tokens (see `policy.ppo.core`); position t holds what the model says
about token t of the response, read at the position that predicts it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from common.backbone import PersonalizedBackbone
from common.batching import PairEncoder, collate_sequences, length_sorted_batches
from common.config import Config, ConfigError
from common.trainer import user_model_groups
from policy.model import PersonalizedPolicy, response_logps
from policy.ppo.core import entropy_from_logits
from preference_data.vocab import GENERIC, UserVocab
from reward.model import rm_run_problem
from user_models import UserModel

VALUE_HEAD = "value"  # head name in the PPO run's checkpoint/: value_head.safetensors


# ------------------------------------------------------------------------------------------------ alignment


def response_index(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, k) of the response tokens of a (prefixed) batch: hidden position `cols` of row `rows` predicts
    response token number `k`. Labels are -100 everywhere but on response tokens, so padding inside the prefix
    (packed by `prepend_prefix`) and prompt lengths need no special case."""
    is_label = labels[:, 1:] != -100
    rows, cols = is_label.nonzero(as_tuple=True)
    k = (is_label.long().cumsum(1) - 1)[rows, cols]
    return rows, cols, k


def _scatter(values: torch.Tensor, rows, k, batch: int, width: int) -> torch.Tensor:
    out = torch.zeros(batch, width, dtype=values.dtype, device=values.device)
    out[rows, k] = values
    return out


class _SamplingHead:
    """The logits generation samples from (before top-k / top-p): lm_head(h) / temperature, with EOS ruled out on
    the first `min_new_tokens` response tokens as `generate(min_new_tokens=...)` rules it out. Log-probs, ratios,
    KL and entropy are then those of the distribution the rollouts were drawn from; with the full softmax, every
    sample with a negative advantage would push probability onto an EOS the sampler never draws, and greedy
    decoding would end up answering with nothing."""

    def __init__(self, head, temperature: float, eos_id: int | None = None, no_eos: torch.Tensor | None = None):
        self.head, self.temperature, self.eos_id, self.no_eos = head, temperature, eos_id, no_eos

    def __call__(self, h):
        logits = self.head(h.to(self.head.weight.dtype))
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.eos_id is not None and self.no_eos is not None and bool(self.no_eos.any()):
            # in place on the EOS column (no second [positions, vocab] tensor; the matmul's backward does not need
            # its output); a large finite value, not -inf: softmax gives exactly 0 and the entropy's 0 * logit is 0.
            # float16 cannot hold -1e9 (its range ends at 65504); half its lowest value leaves room for the
            # log-softmax's shift
            logits[:, self.eos_id].masked_fill_(self.no_eos, max(-1e9, torch.finfo(logits.dtype).min / 2))
        return logits


def _token_logps(hidden, labels, lm_head, temperature: float, width: int, with_entropy: bool,
                 eos_id: int | None = None, min_new_tokens: int = 0):
    _, _, k = response_index(labels)
    head = _SamplingHead(lm_head, temperature, eos_id, k < min_new_tokens if min_new_tokens > 0 else None)
    _, dense, logits, (rows, cols) = response_logps(hidden, labels, head, return_per_token=True)
    B = labels.shape[0]
    logps = _scatter(dense[rows, cols], rows, k, B, width)
    mask = _scatter(torch.ones_like(dense[rows, cols]), rows, k, B, width)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = _scatter(entropy_from_logits(logits), rows, k, B, width)
    return logps, mask, entropy


# ------------------------------------------------------------------------------------------------ roles


class Actor:
    """pi_P(y | x, u): the personalized policy with its user prefix and LoRA adapters."""

    def __init__(self, policy: PersonalizedPolicy, temperature: float = 1.0, eos_id: int | None = None,
                 min_new_tokens: int = 0):
        self.policy = policy
        self.temperature = float(temperature)
        self.eos_id, self.min_new_tokens = eos_id, int(min_new_tokens)  # the sampler's EOS rule, for log-probs

    @property
    def backbone(self) -> PersonalizedBackbone:
        return self.policy.backbone

    def hidden(self, batch: dict):
        """(hidden [B, T_u + L, d], PrefixedInputs) of [prefix, prompt, response] rows (right-padded batch)."""
        return self.backbone.hidden_states(batch)

    def token_logps(self, hidden, inputs, width: int, with_entropy: bool = False):
        """(log pi(y_t | x, u, y_<t) [B, W], response mask [B, W], entropy [B, W] or None)."""
        return _token_logps(hidden, inputs.labels, self.backbone.lm_head, self.temperature, width, with_entropy,
                            self.eos_id, self.min_new_tokens)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], user_idx: torch.Tensor, texts: list[list[int]] | None,
                 pad_id: int, eos_id: int, max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, min_new_tokens: int = 0, greedy_rows: list[bool] | None = None) -> list[list[int]]:
        """Sampled responses (left-padded batch, KV cache), each cut after its first EOS. Every sampling option
        is passed explicitly so that a model's own generation_config cannot change the distribution. Without top-k
        or top-p, `policy.decoding.decode` samples (one random number per row and token; finished rows leave).
        `greedy_rows`: rows that take the most likely token at each step instead (what people are shown)."""
        return self.policy.generate(prompts, user_idx, texts, pad_id=pad_id, greedy_rows=greedy_rows,
                                    do_sample=True, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_id,
                                    repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True)


class Critic:
    """V(s_t) for every response token, from a value head on the actor's backbone (shared) or its own."""

    def __init__(self, head: nn.Linear, backbone: PersonalizedBackbone | None = None):
        self.head = head
        self.backbone = backbone  # None: shared with the actor

    @property
    def shared(self) -> bool:
        return self.backbone is None

    def values_from_hidden(self, hidden, inputs, width: int) -> torch.Tensor:
        rows, cols, k = response_index(inputs.labels)
        h = hidden[:, :-1][rows, cols]
        v = self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()
        return _scatter(v, rows, k, hidden.shape[0], width)

    def values(self, batch: dict, width: int, hidden=None, inputs=None) -> torch.Tensor:
        """Values [B, W]; a shared critic needs the actor's (hidden, inputs) of the same batch."""
        if self.shared:
            if hidden is None:
                raise ValueError("a shared critic reads the actor's hidden states: pass hidden and inputs")
            return self.values_from_hidden(hidden, inputs, width)
        h, inp = self.backbone.hidden_states(batch)
        return self.values_from_hidden(h, inp, width)


class Reference:
    """pi_SFT(y | x): the actor's backbone with adapters off and the reference prefix (train_sft's generic soft
    prompt), whatever the sample's user."""

    def __init__(self, backbone: PersonalizedBackbone, temperature: float = 1.0, eos_id: int | None = None,
                 min_new_tokens: int = 0):
        self.backbone = backbone
        self.temperature = float(temperature)
        self.eos_id, self.min_new_tokens = eos_id, int(min_new_tokens)  # KL between the same constrained laws

    @torch.no_grad()
    def token_logps(self, batch: dict, width: int) -> torch.Tensor:
        with self.backbone.reference() as ref_lm:
            hidden, inputs = self.backbone.hidden_states(batch, lm=ref_lm, reference=True)
            logps, _, _ = _token_logps(hidden, inputs.labels, ref_lm.lm_head, self.temperature, width, False,
                                       self.eos_id, self.min_new_tokens)
        return logps


class Reward:
    """The frozen reward model of a `train_rm` run, scoring answers for a source user id.

    Answers are scored whole, however long: a response that ended with EOS keeps its EOS (as every complete answer
    in RM training did), one cut by max_new_tokens has none. PPO's rollouts are scored on the actor's own token ids
    when the RM shares the actor's tokenizer (`score_rollout`): decoding and re-encoding can change the tokens.
    Otherwise (an RM on another base model) the text is re-encoded with the RM's tokenizer and chat template.
    """

    def __init__(self, model, tokenizer, vocab: UserVocab, cfg: Config, run_dir: Path | None = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.encoder = PairEncoder.from_config(tokenizer, cfg)
        self._prompt_cache: dict[str, list[int]] = {}
        self._same_tokenizer: dict[int, bool] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def user_index(self, user_id: str | None) -> int:
        """The RM's index of a source user id (unseen or None: the generic user 0)."""
        return self.vocab.index(user_id)

    def shares_tokenizer(self, tokenizer) -> bool:
        """Whether token ids of `tokenizer` mean the same to the RM (same vocabulary and EOS)."""
        key = id(tokenizer)
        if key not in self._same_tokenizer:
            self._same_tokenizer[key] = (tokenizer is self.tokenizer or (
                tokenizer.eos_token_id == self.tokenizer.eos_token_id
                and tokenizer.get_vocab() == self.tokenizer.get_vocab()))
        return self._same_tokenizer[key]

    def _prompt(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.encoder.prompt_ids(prompt, "ppo prompt")
        return self._prompt_cache[prompt]

    def _response(self, text: str, ended: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids + [self.tokenizer.eos_token_id] if ended else ids

    @torch.no_grad()
    def score_ids(self, prompts: list[str], response_ids: list[list[int]], user_ids: list[str | None],
                  user_texts: list[str | None] | None = None, batch_size: int = 16) -> torch.Tensor:
        """r(x, y, u) [N] (float32, CPU) of responses given as the RM tokenizer's ids (EOS included where the answer
        ended), each for `user_ids[i]`; prompts are laid out with the RM's own chat template."""
        n = len(prompts)
        if not (len(response_ids) == len(user_ids) == n):
            raise ValueError("prompts, response_ids and user_ids must have the same length")
        user_texts = user_texts if user_texts is not None else [None] * n
        pad_id = self.tokenizer.pad_token_id
        out = torch.zeros(n)
        lengths = [len(self._prompt(p)) + len(r) for p, r in zip(prompts, response_ids)]
        for sl in length_sorted_batches(lengths, batch_size):
            batch = collate_sequences([self._prompt(prompts[i]) for i in sl], [list(response_ids[i]) for i in sl],
                                      [self.user_index(user_ids[i]) for i in sl],
                                      [self.encoder.text_ids(user_texts[i]) for i in sl], pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out[sl] = self.model(batch).float().cpu()
        return out

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], user_ids: list[str | None],
              ended: list[bool] | None = None, user_texts: list[str | None] | None = None,
              batch_size: int = 16) -> torch.Tensor:
        """r(x, y, u) [N] (float32, CPU) of response texts, row i for `user_ids[i]`; `ended[i]` (default True)
        appends the RM's EOS."""
        if not (len(prompts) == len(responses) == len(user_ids)):
            raise ValueError("prompts, responses and user_ids must have the same length")
        ended = ended if ended is not None else [True] * len(prompts)
        ids = [self._response(t, e) for t, e in zip(responses, ended)]
        return self.score_ids(prompts, ids, user_ids, user_texts, batch_size)

    @torch.no_grad()
    def score_rollout(self, prompts: list[str], response_ids: list[list[int]], texts: list[str], ended: list[bool],
                      user_ids: list[str | None], tokenizer, user_texts: list[str | None] | None = None,
                      batch_size: int = 16) -> torch.Tensor:
        """Scores of sampled responses: the actor's own token ids (EOS kept) when the RM shares `tokenizer`, else
        the decoded texts re-encoded (with the RM's EOS where the response ended)."""
        if self.shares_tokenizer(tokenizer):
            return self.score_ids(prompts, response_ids, user_ids, user_texts, batch_size)
        return self.score(prompts, texts, user_ids, ended, user_texts, batch_size)

    @torch.no_grad()
    def score_texts_per_user(self, generation: dict, users: dict[str, int] | None = None) -> dict[str, float]:
        """Mean reward of each label's generated responses, scored for that label's user.

        `generation` is `policy.generation.generate_per_user`'s result: responses are read from
        `generation["texts"][label]` ([{"prompt", "response"}], all of them) when present, else from
        `generation["examples"][label]`. A label is a source user id; `<generic>`, `<reference>` and ids the RM
        does not know are scored as the generic user 0. Responses are taken as finished (EOS appended).
        """
        source = generation.get("texts") or generation.get("examples") or {}
        out = {}
        for label, rows in source.items():
            if users is not None and label not in users and label != "<reference>":
                continue
            if not rows:
                continue
            uid = label if label in self.vocab else None
            r = self.score([x["prompt"] for x in rows], [x["response"] for x in rows], [uid] * len(rows))
            out[label] = float(r.mean())
        return out


# ------------------------------------------------------------------------------------------------ loading


def check_rm_run(rm_run: str | None, key: str = "ppo.rm_run") -> Path:
    """The folder of a *finished* train_rm run, or ConfigError naming the config key. Reads no model."""
    if not rm_run:
        raise ConfigError(f"config key '{key}' is required: the run folder of a finished train_rm run "
                          "(the frozen reward model PPO optimises)")
    if not Path(rm_run).is_dir():
        raise ConfigError(f"config key '{key}' names a folder that does not exist: {rm_run}")
    problem = rm_run_problem(rm_run)
    if problem:
        raise ConfigError(f"config key '{key}' = {rm_run}: {problem}; finish `python -m pipelines.train_rm` first")
    return Path(rm_run)


def _check_same_user_model(target: UserModel, source: UserModel, how: str) -> None:
    want = {k: v for k, v in source.describe().items() if k not in ("dtype", "num_parameters")}
    have = {k: v for k, v in target.describe().items() if k not in ("dtype", "num_parameters")}
    if want != have:
        diff = {k: (have.get(k), want.get(k)) for k in want.keys() | have.keys() if have.get(k) != want.get(k)}
        raise ConfigError(f"config key 'ppo.init_user_model' = '{how}': the actor's user model does not match the "
                          f"RM's ({', '.join(f'{k}: {a} here vs {b} in the RM' for k, (a, b) in sorted(diff.items()))})"
                          "; set user_model.* like the RM run's config, or use 'fresh'")


def init_user_model_from_rm(target: UserModel, reward: Reward, scale: float = 1.0) -> None:
    """Start `target`'s per-user parameters (individual o_i, cluster logits a_i) from the RM's trained ones times
    `scale` (`ppo.init_user_model=rm`); its shared part (e_0, the centres) keeps its own init. The actor's users are
    the RM's users (same vocabulary, same indices), so a user's row carries over as is; a different kind or shape
    is a config error naming the key. The actor then no longer starts at pi_SFT."""
    source = reward.model.backbone.user_model
    _check_same_user_model(target, source, "rm")
    with torch.no_grad():
        for mine, theirs in zip(target.implicit.user_parameters(1), source.implicit.user_parameters(1)):
            mine.copy_(theirs.to(mine) * scale)


def gate_user_model_on_rm(target: UserModel, reward: Reward) -> None:
    """`ppo.init_user_model=rm_gated`: each user's offset is the RM's trained row of that user times a learned
    scalar gate that starts at 0 (`IndividualUserModel.gate_directions`). The actor starts exactly at pi_SFT, and
    PPO learns one number per user along a direction the RM found for that user (users the RM found alike point
    alike), instead of T_u x d numbers from a few noisy rollouts per iteration. Individual user models only."""
    from user_models.implicit import IndividualUserModel

    source = reward.model.backbone.user_model
    _check_same_user_model(target, source, "rm_gated")
    if not isinstance(target.implicit, IndividualUserModel):
        raise ConfigError("config key 'ppo.init_user_model' = 'rm_gated' needs user_model.kind=individual (its "
                          f"offsets are gated RM rows), got {target.kind!r}; use 'fresh' or 'rm'")
    target.implicit.gate_directions(source.implicit.offsets.weight.detach())


def seed_clusters_from_rm(target: UserModel, reward: Reward, logit: float, seed: int = 0) -> list[int]:
    """`ppo.init_user_model=rm_clusters`: group the RM's users by the directions of their trained rows (each user's
    soft prompt minus the generic user's; spherical k-means with the actor's K) and start each user's cluster logits
    at `logit` for its group's centre, 0 for the others. The generic user stays at the even mixture. Returns the
    users' clusters (user index i at position i - 1).

    Only the weights are seeded: the centres keep their own init, so from a `model.sft_run` (every centre = pi_SFT's
    prompt) the actor still starts exactly at pi_SFT, whatever the weights. What PPO no longer has to find from a few
    noisy rollouts per user is who belongs together; the RM learned that from every comparison."""
    from user_models.clustering import spherical_kmeans
    from user_models.implicit import ClusterUserModel

    if not isinstance(target.implicit, ClusterUserModel):
        raise ConfigError("config key 'ppo.init_user_model' = 'rm_clusters' needs user_model.kind=cluster (it seeds "
                          f"the cluster weights), got {target.kind!r}")
    source = reward.model.backbone.user_model
    if source.n_users != target.n_users:
        raise ConfigError(f"config key 'ppo.init_user_model' = 'rm_clusters': the RM has {source.n_users} users, "
                          f"the actor {target.n_users}; PPO's users must be the RM's")
    k = target.implicit.n_clusters
    if source.n_users < k:
        raise ConfigError(f"config key 'user_model.n_clusters' is {k}, more than the RM's {source.n_users} users")
    with torch.no_grad():
        prompts = source.implicit(torch.arange(source.n_users + 1, device=reward.device)).float().cpu()
        rows = (prompts[1:] - prompts[0]).flatten(1)
    if not bool((rows.norm(dim=1) > 0).any()):
        raise ConfigError(f"config key 'ppo.init_user_model' = 'rm_clusters': the RM's users all have the generic "
                          f"user's prompt ({source.kind} user model), so there is nothing to group")
    groups = spherical_kmeans(rows, k, seed=seed)
    with torch.no_grad():
        logits = target.implicit.logits.weight
        logits.zero_()
        logits[torch.arange(1, source.n_users + 1), groups.to(logits.device)] = logit
    return groups.tolist()


def load_reward_role(rm_run: str | Path, device: torch.device | str) -> Reward:
    """The frozen `Reward` role of a finished train_rm run (also what `evaluate` uses to score PPO samples)."""
    from common.run import load_backbone_from_run
    from reward.model import load_reward_model

    run = check_rm_run(str(rm_run))
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # the head's throw-away init must not move anyone's RNG
        cfg, backbone, tokenizer, vocab, _ = load_backbone_from_run(run, device)
        rm = load_reward_model(run, cfg, backbone)
    rm.to(device)
    return Reward(rm, tokenizer, vocab, cfg, run)


class PPOModules(nn.Module):
    """Every trainable parameter of PPO in one module (the optimizer's / DeepSpeed engine's view and what
    resumable checkpoints save): actor backbone, value head and, when separate, the critic's backbone."""

    def __init__(self, actor: PersonalizedBackbone, value_head: nn.Linear,
                 critic: PersonalizedBackbone | None = None):
        super().__init__()
        self.actor = actor
        self.value_head = value_head
        self.critic = critic

    def forward(self, *args, **kwargs):  # the roles call the parts; DeepSpeed only needs a module
        raise RuntimeError("PPOModules is a parameter container; use the Actor / Critic roles")

    def param_groups(self, cfg: Config) -> list[dict]:
        """LLM adapters and heads at train.lr (with weight decay); user models at their own rates (see
        `common.trainer.user_model_groups`), never decayed."""
        backbones = [self.actor] + ([self.critic] if self.critic is not None else [])
        llm = [p for b in backbones for p in b.llm_trainable_parameters()]
        heads = [p for p in self.value_head.parameters() if p.requires_grad]
        return [{"params": llm + heads, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "name": "llm+heads"},
                *user_model_groups([b.user_model for b in backbones], cfg)]


def new_value_head(hidden_size: int, dtype: torch.dtype) -> nn.Linear:
    """Zero-initialised: values start at 0 and, on a shared backbone, the first value gradients do not reach
    (and disturb) the actor."""
    head = nn.Linear(hidden_size, 1, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    return head.to(dtype)


def build_roles(cfg: Config, n_users: int, device: torch.device):
    """(modules, actor, critic, reference, tokenizer) for a fresh PPO run: a new backbone (LoRA + user model with
    `n_users` seen users) for the actor and, with `ppo.critic=separate`, another one for the critic."""
    from common.run import build_backbone

    torch.manual_seed(cfg.seed)  # the actor's init does not depend on what was built before it
    backbone, tokenizer = build_backbone(cfg, n_users, device)
    head = new_value_head(backbone.hidden_size, torch.float32).to(device)  # trained: float32 (common.precision)
    critic_backbone = None
    if cfg.ppo.critic == "separate":
        torch.manual_seed(cfg.seed + 1)
        critic_backbone, _ = build_backbone(cfg, n_users, device)
    modules = PPOModules(backbone, head, critic_backbone)
    sampler = dict(eos_id=tokenizer.eos_token_id, min_new_tokens=cfg.ppo.min_new_tokens)
    actor = Actor(PersonalizedPolicy(backbone), cfg.ppo.temperature, **sampler)
    critic = Critic(head, critic_backbone)
    reference = Reference(backbone, cfg.ppo.temperature, **sampler)
    return modules, actor, critic, reference, tokenizer


def user_key(user_id: str | None) -> str:
    """Name of a rollout user in logs and ppo_history.json (the generic user 0 is `<generic>`)."""
    return "<generic>" if user_id is None else str(user_id)


__all__ = ["Actor", "Critic", "Reference", "Reward", "PPOModules", "build_roles", "check_rm_run",
           "load_reward_role", "init_user_model_from_rm", "gate_user_model_on_rm", "seed_clusters_from_rm",
           "new_value_head", "response_index", "user_key", "VALUE_HEAD", "GENERIC"]
