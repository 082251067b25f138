"""What the decode engine needs from a finished policy run: the LLM, the tokenizer and a swappable user table.

`UserTable` is an immutable snapshot (user vocabulary + user model). Onboarding a user builds a new snapshot and
swaps the reference in one assignment; the engine reads the reference once per admission, and rows already
decoding carry their prefix in the KV cache, so a swap never changes a request in flight.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from policy.decoding import cache_kwarg, returned_cache
from policy.loading import PolicyRun
from preference_data.vocab import UserVocab
from user_models import UserModel


@dataclass(frozen=True)
class ResolvedUser:
    user_id: str | None  # as the request named it
    index: int  # row of the user table (0: generic)
    personalized: bool  # whether the answer is this user's own (False: the generic user's, or no user at all)


@dataclass(frozen=True)
class UserTable:
    """Who maps to which row, as `PolicyRun.user_index` / `generate_texts` map them."""

    vocab: UserVocab
    user_model: UserModel | None  # None: the run is decoded without a user prefix (an SFT run without a prompt)
    per_user_rows: bool  # users have rows of their own (False: SFT, or a uniform user model: one prefix for all)
    use_text: bool  # the explicit user model reads user text

    def knows(self, user_id: str | None) -> bool:
        return user_id is not None and user_id in self.vocab

    def resolve(self, user_id: str | None, has_text: bool = False) -> ResolvedUser:
        """The row of a source user id; an unseen (or missing) id, or any id of a run without per-user rows, is
        the generic user 0."""
        known = self.knows(user_id) and self.per_user_rows
        personalized = known or (self.user_model is not None and self.use_text and has_text)
        return ResolvedUser(user_id, self.vocab.index(user_id) if known else 0, personalized)


class ServedPolicy:
    """A loaded policy run as the engine sees it."""

    def __init__(self, run: PolicyRun):
        self.run = run
        self.lm = run.policy.backbone.base_lm  # the causal LM with the run's LoRA active
        self.tokenizer = run.tokenizer
        self.encoder = run.encoder
        self.device = run.device
        self.pad_id = run.tokenizer.pad_token_id
        eos = run.tokenizer.eos_token_id
        self.eos_ids = [eos] if eos is not None else []
        self.min_new_tokens = run.min_new_tokens
        self.max_positions = int(getattr(self.lm.config, "max_position_embeddings", 0) or 0) or None
        self.users = self.make_table(run.vocab, run.policy.user_model)
        self._cache_arg = cache_kwarg(self.lm)

    def make_table(self, vocab: UserVocab, user_model: UserModel) -> UserTable:
        if not self.run.uses_prefix:
            return UserTable(vocab, None, False, False)
        user_model = user_model.to(self.device).eval()
        # PolicyRun.personalized, for this (possibly newer) table
        per_user = self.run.personalized and user_model.kind != "uniform"
        return UserTable(vocab, user_model, per_user, bool(self.run.cfg.user_model.use_text))

    @property
    def prefix_tokens(self) -> int:
        """Positions the user prefix takes in front of the prompt (implicit part; user text adds its length)."""
        return self.users.user_model.n_tokens if self.users.user_model is not None else 0

    def text_ids(self, user_text: str | None) -> list[int]:
        """The user text's tokens for the explicit user model ([] when the run does not read user text)."""
        if self.users.user_model is None or not self.users.use_text:
            return []
        return self.encoder.text_ids(user_text)

    def autocast(self):
        """The compute precision `PersonalizedPolicy.generate` decodes in (the backbone's autocast)."""
        autocast = getattr(self.run.policy.backbone, "autocast", None)
        return autocast() if autocast is not None else contextlib.nullcontext()

    def forward(self, cache=None, **inputs) -> tuple[torch.Tensor, object]:
        """(logits of each row's last position [B, V], the KV cache) of one forward with the cache."""
        with self.autocast():
            out = self.lm(**inputs, **{self._cache_arg: cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], returned_cache(out)

    @torch.no_grad()
    def prefill_inputs(self, prompts: list[list[int]], users: UserTable, user_idx: list[int],
                       texts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds, attention_mask, position_ids) of left-padded [pads, prefix, prompt] rows: exactly the
        layout `PersonalizedPolicy.generate` builds (through the one `prepend_prefix`)."""
        with self.autocast():
            return self._prefill_inputs(prompts, users, user_idx, texts)

    def _prefill_inputs(self, prompts, users, user_idx, texts):
        from common.batching import pad
        from user_models import prepend_prefix

        input_ids = pad(prompts, self.pad_id, side="left").to(self.device)
        mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(self.device)
        embed = self.lm.get_input_embeddings()
        token_embeds = embed(input_ids)
        if users.user_model is None:
            return token_embeds, mask, (mask.long().cumsum(1) - 1).clamp(min=0)
        text_ids = pad(texts, self.pad_id).to(self.device)
        text_mask = pad([[1] * len(t) for t in texts], 0).to(self.device)
        prefix = users.user_model(torch.tensor(user_idx, dtype=torch.long, device=self.device), text_ids, text_mask,
                                  embed_tokens=embed)
        inputs = prepend_prefix(prefix.embeds, prefix.mask, token_embeds, mask, padding_side="left")
        return inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids
