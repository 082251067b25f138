"""Degenerate negatives for the reward model: pairs in which every user prefers a real answer to a broken one.

An RM trained only on real answers has never seen an empty answer, a loop or word salad, and scores them by what
they resemble: for a user who prefers short answers, "the shortest answer of all". PPO finds such strings within a
few iterations (docs/results.md, PPO third round). These extra pairs keep the prompt and the user of a training
record, take its chosen answer as the preferred side and a degenerate answer as the rejected side.
"""

from __future__ import annotations

import random

from common.batching import EncodedPair


def degenerate_answers(chosen_ids: list[int], eos_id: int, max_len: int,
                       rng: random.Random | None = None) -> list[list[int]]:
    """The kinds of broken answer PPO produced on the demo, built from a real answer itself so that only fluency
    separates them from it:
    nothing (EOS at once); one token of the answer repeated ("ZZZZ..."); a two-token loop ("A.E.A.E...", "Aron
    Aron."); the answer's own tokens shuffled, its length and its EOS kept (a short answer that is not an answer:
    without it the RM of a user who prefers short answers ranks any short string high); a passage loop, the
    answer's opening and then its last few tokens over and over ("Bees pollinate crops. Bees also pollinate crops,
    and ... Bees also pollinate crops, and ..."): what PPO found for users who prefer long answers, since a reward
    that grows with every real-looking token pays a loop as well as new content. Runs and loops get a random length
    up to `max_len` and end with EOS half the time (as a policy's would, or cut by max_new_tokens): an RM that saw
    them only at the length limit scored a 20-token run like a real answer of 20 tokens."""
    rng = rng or random.Random(0)
    ended = bool(chosen_ids) and chosen_ids[-1] == eos_id
    body = [t for t in chosen_ids if t != eos_id] or [eos_id]

    def length_and_end(kind: list[int]) -> list[int]:
        n = rng.randint(min(4, max_len), max_len)
        return kind[:n] + ([eos_id] if rng.random() < 0.5 and n < max_len else [])

    run = length_and_end([body[0]] * max_len)
    loop = length_and_end((body[:2] * max_len)[:max_len])
    shuffled = body[:]
    for _ in range(3):  # a permutation that differs from the answer (unless every token is the same)
        rng.shuffle(shuffled)
        if shuffled != body:
            break
    return [[eos_id], run, loop, shuffled + ([eos_id] if ended else []), passage_loop(body, eos_id, max_len, rng)]


def passage_loop(body: list[int], eos_id: int, max_len: int, rng: random.Random) -> list[int]:
    """The first k tokens of `body`, then its tokens k-m .. k repeated (m from 4 to 16), at least twice over, up to
    a random length <= max_len; EOS half the time when it stops short of max_len."""
    k = rng.randint(1, max(1, min(len(body), max_len // 3)))
    m = rng.randint(min(4, k), max(min(4, k), min(16, k, max_len // 3)))
    opening, span = body[:k], body[k - m:k]
    n = rng.randint(min(max_len, k + 2 * m), max_len)
    return (opening + span * max_len)[:n] + ([eos_id] if rng.random() < 0.5 and n < max_len else [])


def degenerate_negative_pairs(pairs: list[EncodedPair], share: float, eos_id: int, max_len: int,
                              seed: int) -> list[EncodedPair]:
    """round(share * len(pairs)) extra pairs from records drawn without replacement (seeded), cycling through the
    kinds of `degenerate_answers`. The preferred side is one of the record's two real answers, drawn at random:
    every user prefers *any* real answer to a broken one, also the answer that user likes less (a user who prefers
    long answers must still rank a real short answer above "ZZZZ")."""
    n = round(share * len(pairs))
    if n <= 0:
        return []
    rng = random.Random(seed)
    picked = rng.sample(range(len(pairs)), min(n, len(pairs)))
    out = []
    for k, i in enumerate(picked):
        p = pairs[i]
        real = p.chosen_ids if rng.random() < 0.5 else p.rejected_ids
        kinds = degenerate_answers(real, eos_id, max_len, rng)
        out.append(EncodedPair(p.prompt_ids, real, kinds[k % len(kinds)], p.user_idx, p.text_ids))
    return out
