"""Choosing the next token from logits: greedy, or sampled after the usual filters, in llama.cpp's
order — repetition penalty, temperature, top-k, top-p, min-p — from a seeded generator. OpenAI's
presence and frequency penalties come right after the repetition penalty (vLLM's order), over
the generated tokens only.

``sample_rows`` is the one implementation: a vectorised pass over a batch's logits rows, each row
with its own parameters, generator and history. A row's result depends only on its own inputs
(every reduction runs along that row), so a seeded request draws the same tokens alone
(``Sampler``, one row) as in any batch (the engine). A sampled row takes exactly one uniform draw
from its generator; a greedy row takes none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from llmc.errors import UsageError, is_int


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 means greedy
    top_k: int = 0                    # 0 means no limit
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # > 1 discourages tokens already in the context
    seed: Optional[int] = None
    presence_penalty: float = 0.0     # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0    # subtracted once for each time a token was generated so far

    def __post_init__(self):
        number = (int, float)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
                raise UsageError(f"bad sampling parameters: {name} must be a finite number, not {value!r}")
        seed = self.seed
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (is_int(self.top_k) and self.top_k >= 0,
             "top_k must be an int >= 0 (0 means no limit)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 means none)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2] (0 means none)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2] (0 means none)"),
            (seed is None or (is_int(seed) and 0 <= seed < 2 ** 63),
             "seed must be an int in [0, 2**63) or None"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"bad sampling parameters: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def reads_history(self) -> bool:
        """Whether the tokens so far change the choice (any of the penalties)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


NUCLEUS_CANDIDATES = 512        # the most likely tokens top-p sorts before it falls back to the whole row


def sample_rows(logits: np.ndarray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator],
                histories: Sequence[Sequence[int]], generated: Sequence[int] | None = None) -> np.ndarray:
    """The next token of each row of ``logits`` [rows, vocab], row i with ``params[i]``,
    ``rngs[i]`` (drawn from once if it samples) and ``histories[i]``, the row's tokens so far
    (for the penalties), of which the last ``generated[i]`` (default none) are generated ones.

    The arithmetic is fixed (float64, in this order), so a row's token depends only on its own
    inputs; the work is kept small for a batch: arithmetic in place, exponentials only where a
    top-k left a finite logit, top-p sorting only a row's most likely tokens, and the final sums
    only over the tokens left."""
    x = penalized(logits, params, histories, generated)
    rows, vocab = x.shape
    out = np.argmax(x, axis=1)
    hot = [i for i, p in enumerate(params) if not p.greedy]
    if not hot:
        return out
    z = x if len(hot) == rows else x[hot]
    z /= np.array([[params[i].temperature] for i in hot])
    probs = _softmax_numerators(z, np.array([params[i].top_k for i in hot]))
    probs /= probs.sum(axis=1, keepdims=True)
    top_p = np.array([params[i].top_p for i in hot])
    nucleus = np.flatnonzero(top_p < 1.0)
    if nucleus.size:
        probs[nucleus] = _nucleus(probs[nucleus], top_p[nucleus])
    min_p = np.array([[params[i].min_p] for i in hot])
    if min_p.any():
        probs = np.where(probs >= min_p * probs.max(axis=1, keepdims=True), probs, 0.0)
    probs /= probs.sum(axis=1, keepdims=True)
    # One uniform draw a row, inverted through the row's cumulative distribution (what
    # numpy's Generator.choice(p=...) does, so seeded runs keep their tokens).
    out[hot] = _draw(probs, np.array([rngs[i].random() for i in hot]))
    return out


def penalized(logits: np.ndarray, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]],
              generated: Sequence[int] | None = None) -> np.ndarray:
    """The rows as float64 (a copy), each with its penalties: the repetition penalty on the tokens
    of its whole history (a positive logit divided by it, a negative one multiplied), then the
    presence penalty once and the frequency penalty once per occurrence on the tokens of its last
    ``generated[i]`` (OpenAI's penalties, which look at the output only)."""
    x = np.array(logits, dtype=np.float64, ndmin=2)
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0 and len(histories[i]):
            seen = np.unique(np.asarray(histories[i], dtype=np.int64))
            values = x[i, seen]
            x[i, seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        made = 0 if generated is None else int(generated[i])
        if (p.presence_penalty or p.frequency_penalty) and made > 0:
            history = histories[i]
            ids, counts = np.unique(np.asarray(history[len(history) - made:], dtype=np.int64), return_counts=True)
            x[i, ids] -= p.presence_penalty + p.frequency_penalty * counts
    return x


def _softmax_numerators(z: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """exp(z - the row's max) (``z`` is overwritten), 0 for what is below the row's k-th largest
    value (top-k; 0: no limit, rows grouped by k). Only the tokens a top-k keeps are
    exponentiated."""
    vocab = z.shape[1]
    top = z.max(axis=1, keepdims=True)
    limited = (ks > 0) & (ks < vocab)
    free = np.flatnonzero(~limited)
    if free.size == len(ks):
        z -= top
        return np.exp(z, out=z)
    probs = np.zeros_like(z)
    if free.size:
        probs[free] = np.exp(z[free] - top[free])
    for k in np.unique(ks[limited]):
        rows_k = np.flatnonzero(ks == k)
        sub = z[rows_k]
        keep = sub >= np.partition(sub, -k, axis=1)[:, -k, None]
        kept = np.zeros_like(sub)
        kept[keep] = np.exp((sub - top[rows_k])[keep])
        probs[rows_k] = kept
    return probs


def _nucleus(probs: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Each row of ``probs`` with only its nucleus left: the smallest set of most likely tokens
    (ties in order of id) whose mass reaches the row's ``top_p``.

    Only a row's likeliest tokens are sorted: its NUCLEUS_CANDIDATES most likely non-zero ones and
    every token tied with the least of them. All other tokens are less likely, so these come first
    in the row's full order too, and a nucleus that they hold is summed exactly as a sort of the
    whole row would sum it; a row whose nucleus they do not hold sorts the whole row."""
    out = np.zeros_like(probs)
    for i, row in enumerate(probs):
        cand = np.flatnonzero(row)
        if cand.size > NUCLEUS_CANDIDATES:
            values = row[cand]
            least = np.partition(values, cand.size - NUCLEUS_CANDIDATES)[cand.size - NUCLEUS_CANDIDATES]
            cand = cand[values >= least]
        ids, count = _sorted_nucleus(row, cand, top_p[i])
        if count > cand.size:
            ids, count = _sorted_nucleus(row, np.arange(row.size), top_p[i])
        keep = ids[:count]
        out[i, keep] = row[keep]
    return out


def _sorted_nucleus(row: np.ndarray, cand: np.ndarray, top_p: float) -> tuple[np.ndarray, int]:
    """``cand`` (ascending ids) most likely first, ties by id, and how many of them the nucleus
    takes (one more than ``cand`` has if their mass does not reach ``top_p``)."""
    ids = cand[np.argsort(-row[cand], kind="stable")]
    mass = np.cumsum(row[ids])
    return ids, int((mass < top_p).sum()) + 1


def _draw(probs: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Row i's token for the uniform draw ``uniform[i]``: the number of entries of the row's
    normalised cumulative distribution at most the draw. Where most of a row is zero (after a
    top-k or top-p), the sum runs over its non-zero entries only: adding a zero changes no partial
    sum, so the token is the same."""
    rows, vocab = probs.shape
    out = np.empty(rows, np.int64)
    for i, row in enumerate(probs):
        support = np.flatnonzero(row)
        if support.size * 4 > vocab:          # mostly non-zero: the whole row costs less
            support = np.arange(vocab)
        cdf = np.cumsum(row[support])
        cdf /= cdf[-1]
        j = int((cdf <= uniform[i]).sum())
        out[i] = support[j] if j < support.size else vocab - 1
    return out


def top_logprobs(logits: np.ndarray, tokens: np.ndarray, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row, the chosen token's log-probability under the model's own distribution (the
    raw logits, before any sampling filter) and the ``top`` most likely tokens with theirs."""
    x = np.array(logits, dtype=np.float64, ndmin=2)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    result = []
    for row, token in zip(x, tokens):
        best: list[tuple[int, float]] = []
        if top > 0:
            ids = np.argpartition(-row, top - 1)[:top] if top < row.size else np.arange(row.size)
            ids = ids[np.lexsort((ids, -row[ids]))]
            best = [(int(t), float(row[t])) for t in ids]
        result.append((float(row[int(token)]), best))
    return result


class Sampler:
    """One sequence's sampler: its parameters and its own seeded generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = (), generated: int = 0) -> int:
        return int(sample_rows(logits, [self.params], [self.rng], [history], [generated])[0])
