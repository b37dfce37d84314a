"""Perplexity of an artifact on a text: windows of ``context`` tokens advancing by ``stride``; each
token is scored once, by the first window that sees it with the most context (the usual sliding-
window evaluation)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmc.errors import LlmcError, UsageError, is_int
from llmc.runtime.model import Model


@dataclass
class Perplexity:
    perplexity: float
    tokens: int            # tokens scored
    context: int
    stride: int
    seconds: float


def perplexity(model: Model, ids: Sequence[int], context: int = 256, stride: int | None = None,
               by_step: bool = False) -> Perplexity:
    """``by_step`` feeds each window one token at a time, as generation does. On the cpu target
    the two give the same score (a row's arithmetic does not depend on the step it is in); on a
    GPU they agree to fp16 rounding."""
    ids = list(ids)
    stride = max(1, context // 2) if stride is None else stride
    if len(ids) < 2:
        raise LlmcError("perplexity needs a text of at least two tokens")
    if not (is_int(stride) and is_int(context) and 1 <= stride <= context <= model.max_context):
        raise UsageError(f"need 1 <= stride <= context <= max_context ({model.max_context}); got stride {stride}, "
                         f"context {context}")
    start = time.perf_counter()
    total, count, scored_until = 0.0, 0, 1            # token 0 has no prediction
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context, len(ids))
        window = ids[begin:end]
        if by_step:
            logits = np.stack([model.step([token], position) for position, token in enumerate(window)])
        else:
            logits = model.logits(window)
        logits = logits.astype(np.float64)
        first = max(scored_until, begin + 1)
        rows = logits[first - begin - 1: end - begin - 1]
        targets = np.asarray(ids[first:end])
        shifted = rows - rows.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += len(targets)
        scored_until = end
        if end == len(ids):
            break
    return Perplexity(math.exp(total / count), count, context, stride, time.perf_counter() - start)
