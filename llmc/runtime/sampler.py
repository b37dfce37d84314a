"""Choosing the next token from logits: greedy, or sampled after the usual filters, in llama.cpp's
order — repetition penalty, temperature, top-k, top-p, min-p — from a seeded generator.

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

from llmc.errors import LlmcError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 means greedy
    top_k: int = 0                    # 0 means no limit
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # > 1 discourages tokens already in the context
    seed: Optional[int] = None

    def __post_init__(self):
        number = (int, float)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
                raise LlmcError(f"bad sampling parameters: {name} must be a finite number, not {value!r}")
        seed = self.seed
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
             "top_k must be an int >= 0 (0 means no limit)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 means none)"),
            (seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2 ** 63),
             "seed must be an int in [0, 2**63) or None"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlmcError(f"bad sampling parameters: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_rows(logits: np.ndarray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator],
                histories: Sequence[Sequence[int]]) -> np.ndarray:
    """The next token of each row of ``logits`` [rows, vocab], row i with ``params[i]``,
    ``rngs[i]`` (drawn from once if it samples) and ``histories[i]`` (for the repetition penalty)."""
    x = np.array(logits, dtype=np.float64, ndmin=2)        # a copy: the filters write into it
    rows, vocab = x.shape
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0 and len(histories[i]):
            seen = np.unique(np.asarray(histories[i], dtype=np.int64))
            values = x[i, seen]
            x[i, seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    out = np.argmax(x, axis=1)
    hot = [i for i, p in enumerate(params) if not p.greedy]
    if not hot:
        return out
    z = x[hot] / np.array([[params[i].temperature] for i in hot])
    # top-k: everything below the k-th largest logit of its row goes (rows grouped by k).
    ks = np.array([params[i].top_k for i in hot])
    for k in np.unique(ks[(ks > 0) & (ks < vocab)]):
        rows_k = np.flatnonzero(ks == k)
        cutoff = np.partition(z[rows_k], -k, axis=1)[:, -k]
        z[rows_k] = np.where(z[rows_k] >= cutoff[:, None], z[rows_k], -np.inf)
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    # top-p: the smallest set of most likely tokens whose mass reaches top_p (ties in order of id).
    top_p = np.array([params[i].top_p for i in hot])
    nucleus = np.flatnonzero(top_p < 1.0)
    if nucleus.size:
        sub = probs[nucleus]
        order = np.argsort(-sub, axis=1, kind="stable")
        mass = np.cumsum(np.take_along_axis(sub, order, axis=1), axis=1)
        count = (mass < top_p[nucleus, None]).sum(axis=1) + 1
        keep = np.zeros_like(sub, dtype=bool)
        np.put_along_axis(keep, order, np.arange(vocab)[None, :] < count[:, None], axis=1)
        probs[nucleus] = np.where(keep, sub, 0.0)
    min_p = np.array([[params[i].min_p] for i in hot])
    probs = np.where(probs >= min_p * probs.max(axis=1, keepdims=True), probs, 0.0)
    probs /= probs.sum(axis=1, keepdims=True)
    # One uniform draw a row, inverted through the row's cumulative distribution (what
    # numpy's Generator.choice(p=...) does, so seeded runs keep their tokens).
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    uniform = np.array([rngs[i].random() for i in hot])
    out[hot] = np.minimum((cdf <= uniform[:, None]).sum(axis=1), vocab - 1)
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

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        return int(sample_rows(logits, [self.params], [self.rng], [history])[0])
