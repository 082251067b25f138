"""Win-rate statistics. Pure functions of outcomes; nothing here knows about models or judges.

An outcome is the run's result on one item (a (prompt, user) pair) against the baseline: "win", "tie", "loss", or
"invalid" (the judge gave no usable verdict). A tie counts half: win_rate = (win + tie / 2) / n, where n counts
the valid outcomes only (AlpacaEval's convention; invalid ones are reported, never guessed).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
OUTCOMES = ("win", "tie", "loss", "invalid")


def tally(outcomes: Iterable[str]) -> dict:
    """{"win", "tie", "loss", "n", "invalid", "win_rate"}; n = win + tie + loss, win_rate None when n = 0."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for o in outcomes:
        if o not in counts:
            raise ValueError(f"unknown outcome {o!r} (expected one of {', '.join(OUTCOMES)})")
        counts[o] += 1
    n = counts["win"] + counts["tie"] + counts["loss"]
    return {"win": counts["win"], "tie": counts["tie"], "loss": counts["loss"], "n": n,
            "invalid": counts["invalid"], "win_rate": win_rate(counts["win"], counts["tie"], n)}


def win_rate(win: int, tie: int, n: int) -> float | None:
    return (win + 0.5 * tie) / n if n else None


def scores_of(outcomes: Iterable[str]) -> np.ndarray:
    """1 / 0.5 / 0 per valid outcome (invalid ones dropped): the win rate is their mean."""
    return np.array([SCORE[o] for o in outcomes if o != "invalid"], dtype=np.float64)


def bootstrap_ci(scores: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 chunk: int = 2_000_000) -> list[float] | None:
    """Percentile bootstrap interval of the mean score: resample the items with replacement `n_boot` times
    (numpy Generator seeded with `seed`) and take the (1 - level) / 2 and (1 + level) / 2 quantiles of the
    resampled win rates. None without items or with n_boot = 0.

    Resamples are drawn in blocks of at most `chunk` indices, so many items do not need n_boot x n memory at once;
    the draws do not depend on the block size (one generator, drawn row after row)."""
    x = np.asarray(scores, dtype=np.float64)
    n = len(x)
    if n == 0 or n_boot <= 0:
        return None
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    rows = max(1, chunk // n)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return [float(lo), float(hi)]


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # no overflow warning for large |t|


def _penalized_loglik(w: np.ndarray, X: np.ndarray, y: np.ndarray, ridge: float) -> float:
    t = X @ w
    # y * log p + (1 - y) * log(1 - p) = y * t - log(1 + e^t), computed stably
    return float(np.sum(y * t - np.logaddexp(0.0, t)) - 0.5 * ridge * w[1] ** 2)


def length_controlled_win_rate(scores: Sequence[float], word_diff: Sequence[float], ridge: float = 0.1,
                               max_iter: int = 100, tol: float = 1e-10) -> float | None:
    """The win rate predicted for two answers of equal length (AlpacaEval's length-controlled idea, reduced to one
    covariate).

    Fits P(run wins) = sigmoid(b0 + b1 * z), z = word_diff / sd(word_diff) (the run's words minus the baseline's,
    scaled but not centred, so z = 0 still means "equally long"), by maximum likelihood with ties as y = 0.5 (a
    fractional-response, quasi-binomial likelihood) and an L2 penalty `ridge / 2 * b1^2` on the slope only (it keeps
    the fit finite when the outcome is perfectly separated by length; 0 gives the plain MLE). Returns sigmoid(b0).

    Without length variation (sd = 0) or when every score is equal, the model has nothing to control for: the
    plain win rate is returned. None without items."""
    y = np.asarray(scores, dtype=np.float64)
    d = np.asarray(word_diff, dtype=np.float64)
    if len(y) != len(d):
        raise ValueError(f"scores and word_diff differ in length ({len(y)} vs {len(d)})")
    if len(y) == 0:
        return None
    sd = float(d.std())
    if sd == 0.0 or np.all(y == y[0]):
        return float(y.mean())
    X = np.stack([np.ones_like(d), d / sd], axis=1)
    penalty = np.diag([0.0, ridge])
    w = np.zeros(2)
    ll = _penalized_loglik(w, X, y, ridge)
    for _ in range(max_iter):
        p = _sigmoid(X @ w)
        grad = X.T @ (y - p) - penalty @ w
        hess = (X * (p * (1.0 - p))[:, None]).T @ X + penalty
        step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)  # Newton step; the jitter only guards a singular H
        scale = 1.0
        while scale > 1e-8:  # backtracking: Newton on a logistic likelihood can overshoot near separation
            candidate = w + scale * step
            new_ll = _penalized_loglik(candidate, X, y, ridge)
            if new_ll >= ll - 1e-12:
                break
            scale *= 0.5
        w, ll = candidate, new_ll
        if float(np.max(np.abs(scale * step))) < tol:
            break
    return float(_sigmoid(np.array([w[0]]))[0])


def summarize(outcomes: Sequence[str], run_words: Sequence[float], baseline_words: Sequence[float], *,
              n_boot: int = 1000, seed: int = 0, length_controlled: bool = True,
              run_distinct: Sequence[float] | None = None, baseline_distinct: Sequence[float] | None = None) -> dict:
    """One row of winrate.json: the tally, its bootstrap interval (`ci95`), the mean words of both sides over all
    the items (invalid ones included: they describe the answers, not the judge), when given their mean
    distinct-token shares (a judge that counts words prefers a long loop: this says whether the answers it judged
    are real text) and, when asked, the length-controlled win rate over the valid items (`lc_win_rate`)."""
    if not (len(outcomes) == len(run_words) == len(baseline_words)):
        raise ValueError("outcomes, run_words and baseline_words must have the same length")
    row = tally(outcomes)
    row["ci95"] = bootstrap_ci(scores_of(outcomes), n_boot, seed)
    row["mean_words"] = {"run": _mean(run_words), "baseline": _mean(baseline_words)}
    if run_distinct is not None and baseline_distinct is not None:
        if not (len(run_distinct) == len(baseline_distinct) == len(outcomes)):
            raise ValueError("run_distinct and baseline_distinct need one share per outcome")
        row["mean_distinct_token_share"] = {"run": _mean(run_distinct), "baseline": _mean(baseline_distinct)}
    if length_controlled:
        valid = [i for i, o in enumerate(outcomes) if o != "invalid"]
        row["lc_win_rate"] = length_controlled_win_rate([SCORE[outcomes[i]] for i in valid],
                                                        [run_words[i] - baseline_words[i] for i in valid])
    return row


def consistency_rate(agreements: Iterable[bool]) -> float | None:
    """Share of items whose two orders agreed (None when no item was judged in both orders)."""
    a = list(agreements)
    return sum(a) / len(a) if a else None


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if len(values) else None
