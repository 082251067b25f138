"""Records -> token ids -> padded tensors. The user index travels as an integer tensor from here to the one
prefix function; it is never written into the prompt text."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from preference_data.records import DataError, PreferenceRecord
from preference_data.vocab import UserVocab

log = logging.getLogger(__name__)


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    user_idx: int
    text_ids: list[int] = field(default_factory=list)


class PairEncoder:
    """Tokenises records with the model's chat template, truncating per the data config."""

    def __init__(self, tokenizer, max_prompt_length: int, max_response_length: int, max_user_text_length: int = 48,
                 prompt_overflow: str = "truncate", chat_template: str = "auto",
                 system_prompt: str | None = None, use_text: bool = False):
        self.tok = tokenizer
        self.max_prompt, self.max_response, self.max_text = max_prompt_length, max_response_length, max_user_text_length
        self.prompt_overflow = prompt_overflow
        self.use_chat = chat_template == "auto" and getattr(tokenizer, "chat_template", None)
        self.system_prompt = system_prompt
        self.use_text = use_text
        self.n_truncated_prompts = 0
        self.n_truncated_responses = 0
        eos = tokenizer.eos_token_id
        self.eos_id = eos

    @classmethod
    def from_config(cls, tokenizer, cfg) -> "PairEncoder":
        d = cfg.data
        return cls(tokenizer, d.max_prompt_length, d.max_response_length, d.max_user_text_length,
                   d.prompt_overflow, cfg.model.chat_template, cfg.model.system_prompt, cfg.user_model.use_text)

    def prompt_ids(self, prompt: str, where: str = "") -> list[int]:
        if self.use_chat:
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            ids = self.tok(prompt + "\n", add_special_tokens=False).input_ids
        if len(ids) > self.max_prompt:
            if self.prompt_overflow == "error":
                raise DataError(f"{where}: prompt has {len(ids)} tokens, more than data.max_prompt_length="
                                f"{self.max_prompt} (set data.prompt_overflow=truncate to keep its end)")
            self.n_truncated_prompts += 1
            ids = ids[-self.max_prompt:]
        return ids

    def response_ids(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False).input_ids
        if len(ids) + 1 > self.max_response:
            self.n_truncated_responses += 1
            return ids[: self.max_response]  # truncated: no EOS, it did not end here
        return ids + [self.eos_id]

    def text_ids(self, user_text: str | None) -> list[int]:
        if not self.use_text or not user_text:
            return []
        return self.tok(user_text, add_special_tokens=False).input_ids[: self.max_text]

    def encode(self, record: PreferenceRecord, vocab: UserVocab, where: str = "") -> EncodedPair:
        return EncodedPair(self.prompt_ids(record.prompt, where), self.response_ids(record.chosen),
                           self.response_ids(record.rejected), vocab.index(record.user_id),
                           self.text_ids(record.user_text))

    def encode_all(self, records: list[PreferenceRecord], vocab: UserVocab, source: str = "") -> list[EncodedPair]:
        self.n_truncated_prompts = self.n_truncated_responses = 0  # counts are per call
        out = [self.encode(r, vocab, f"{source} record {i + 1}") for i, r in enumerate(records)]
        if self.n_truncated_prompts:
            log.warning("%s: truncated %d prompt(s) to data.max_prompt_length=%d", source or "data",
                        self.n_truncated_prompts, self.max_prompt)
        if self.n_truncated_responses:
            log.warning("%s: truncated %d response(s) to data.max_response_length=%d", source or "data",
                        self.n_truncated_responses, self.max_response)
        return out


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    rows = [([value] * (width - len(s)) + s) if side == "left" else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long).reshape(len(seqs), width)


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices 0..N-1 in batches of at most `batch_size`, shortest rows together (ties in index order): for passes
    whose result does not depend on which rows share a batch (no-grad scoring), every batch is padded only to its
    own longest row. A PPO rollout of the demo mixes 15-token and 96-token answers: in batches of rows in sampling
    order about a third of the positions were padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def collate_sequences(prompts: list[list[int]], responses: list[list[int]], user_idx: list[int],
                      texts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [prompt, response] rows; labels hold the response tokens and -100 elsewhere."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    labels = [[-100] * len(p) + r for p, r in zip(prompts, responses)]
    return {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "labels": pad(labels, -100),
        "user_idx": torch.tensor(user_idx, dtype=torch.long),
        "text_ids": pad(texts, pad_id),
        "text_mask": pad([[1] * len(t) for t in texts], 0),
    }


def pair_sequence_batches(pairs: list[EncodedPair], pad_id: int, batch_size: int):
    """Yields (rows, batch) over the 2N sequences of N pairs, for no-grad scoring: row i is pair i's chosen answer,
    row N + i its rejected one, in batches of at most 2 * batch_size sequences of similar length
    (`length_sorted_batches`), so a pair's short answer is not padded to its long one (`collate_pairs` pads both
    to the longer: on the long-answer set, 30-word answers to 150-word ones)."""
    prompts, responses, users, texts = _pair_sequences(pairs)
    lengths = [len(q) + len(r) + len(t) for q, r, t in zip(prompts, responses, texts)]
    for rows in length_sorted_batches(lengths, 2 * batch_size):
        yield rows, collate_sequences([prompts[i] for i in rows], [responses[i] for i in rows],
                                      [users[i] for i in rows], [texts[i] for i in rows], pad_id)


@torch.no_grad()
def score_pairs(score, pairs: list[EncodedPair], pad_id: int, batch_size: int, device, as_generic: bool = False,
                once_per_pair: bool = False, with_text: bool = True,
                progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(score of each pair's chosen answer, score of its rejected one), float32 on the CPU. `score` maps a collated
    batch of sequences to one value per row (a reward model, a policy's sequence log-prob); the sequences go in
    `pair_sequence_batches`. `as_generic` scores every sequence as the generic user 0. `once_per_pair` scores each
    distinct pair once (`unique_pairs`, `with_text` as there) for scores that do not depend on the annotator.
    `progress` (a tqdm bar) advances by pairs."""
    if once_per_pair:
        unique, where = unique_pairs(pairs, with_text=with_text)
        if len(unique) < len(pairs):
            if progress is not None:
                progress.total = len(unique)
            w, l = score_pairs(score, unique, pad_id, batch_size, device, as_generic, progress=progress)
            idx = torch.tensor(where, dtype=torch.long)
            return w[idx], l[idx]
    n = len(pairs)
    out = torch.zeros(2 * n)
    for rows, batch in pair_sequence_batches(pairs, pad_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        if as_generic:
            batch["user_idx"] = torch.zeros_like(batch["user_idx"])
        out[rows] = score(batch).float().cpu()
        if progress is not None:
            progress.update(len(rows) / 2)
    return out[:n], out[n:]


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """2B rows: the B chosen sequences, then the B rejected ones, each with its pair's user."""
    return collate_sequences(*_pair_sequences(pairs), pad_id)


def _pair_sequences(pairs: list[EncodedPair]) -> tuple[list, list, list, list]:
    """(prompts, responses, users, texts) of the 2N sequences of N pairs: the chosen answers, then the rejected."""
    return ([p.prompt_ids for p in pairs] * 2, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
            [p.user_idx for p in pairs] * 2, [p.text_ids for p in pairs] * 2)


def with_users(batch: dict[str, torch.Tensor], user_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same rows scored as other users (e.g. all generic: zeros)."""
    return {**batch, "user_idx": user_idx}


def concat_batches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Row-concatenate two right-padded batches (pads the shorter one)."""
    out = {}
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "text_ids": pad_id, "text_mask": 0}
    for key in a:
        x, y = a[key], b[key]
        if x.dim() == 2 and x.shape[1] != y.shape[1]:
            w = max(x.shape[1], y.shape[1])
            x = torch.nn.functional.pad(x, (0, w - x.shape[1]), value=fills[key])
            y = torch.nn.functional.pad(y, (0, w - y.shape[1]), value=fills[key])
        out[key] = torch.cat([x, y], 0)
    return out


def unique_pairs(pairs: list[EncodedPair], with_text: bool = True) -> tuple[list[EncodedPair], list[int]]:
    """Distinct pairs by token content (users ignored) and, for each input pair, the index of its distinct pair.

    Scores that do not depend on the user (the reference policy, everyone as the generic user) are computed once
    per distinct pair: in per-user data the same comparison is often labelled by many annotators.
    """
    index: dict[tuple, int] = {}
    unique: list[EncodedPair] = []
    where: list[int] = []
    for p in pairs:
        key = (tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids),
               tuple(p.text_ids) if with_text else ())
        if key not in index:
            index[key] = len(unique)
            unique.append(p)
        where.append(index[key])
    return unique, where
