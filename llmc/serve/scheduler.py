"""Iteration-level scheduling: which tokens of which sequences the next step runs.

Each step has a token budget. It goes first to the running sequences' decode tokens (one each),
then to the chunks of prompts still being prefilled (at most half of what is left while others
wait), then to waiting sequences, admitted first come first served while the budget, the pool and
``max_running`` allow, and what they leave goes back to the prefills. So a long prompt takes the
step's leftover budget, step after step, and neither holds up the others' decoding nor keeps a
new request from starting (chunked prefill).

When a running sequence needs a block and none is left, the most recently admitted sequence is
preempted: its blocks go back to the pool (its full ones stay in the prefix cache), and it waits
at the head of the queue to compute its tokens again — prompt and output so far — and go on with
the same output it would have produced.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmc import abi
from llmc.serve.blocks import ROOT, BlockPool


@dataclass(eq=False)
class Sequence:
    """One completion: its tokens (prompt, then output), how many have their KV in the pool, and
    the blocks that hold them. ``leader`` is the first completion of the same prompt, whose
    prefill this one waits for so that it can share the prompt's blocks."""

    tokens: list[int]
    prompt_len: int
    owner: Any = None                   # what the engine attaches (its request state)
    leader: "Sequence | None" = None
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)    # prefix-cache keys of the full blocks computed
    running: bool = False
    done: bool = False
    preemptions: int = 0
    cached: int = 0                     # prompt tokens the prefix cache supplied at admission


@dataclass
class Plan:
    """One step: the batch, and for each sequence in it the tokens it runs and whether its last
    one is the sequence's last (so the step returns its logits: ``rows[i]`` for ``sampled[i]``)."""

    batch: abi.Batch
    chunks: list[tuple[Sequence, int]]
    sampled: list[Sequence]


class Scheduler:
    def __init__(self, pool: BlockPool, max_running: int, max_step_tokens: int, table_width: int):
        self.pool = pool
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.width = table_width
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preempted = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- membership ------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, aborted or failed) and give its blocks back."""
        seq.done = True
        if seq.running:
            self.running.remove(seq)
            seq.running = False
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._drop_blocks(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- one step --------------------------------------------------------------------------------

    def schedule(self) -> Plan | None:
        """The next step's plan (None if nothing can run)."""
        plan: dict[Sequence, int] = {}
        budget = self.max_step_tokens
        decoding = [s for s in self.running if len(s.tokens) - s.computed == 1]
        prefilling = [s for s in self.running if len(s.tokens) - s.computed > 1]
        for seq in decoding:
            if budget == 0:
                break
            if seq.running:                  # (not if preempted for an earlier sequence's block)
                budget -= self._take(seq, 1, plan)
        # While others wait, the prompts being prefilled leave them half of what is left, so a
        # short request that arrives during a long prefill starts at the next step.
        reserve = budget // 2 if self.waiting and len(self.running) < self.max_running else 0
        for seq in prefilling:
            if budget - reserve <= 0:
                break
            if seq.running:
                budget -= self._take(seq, budget - reserve, plan)
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.running = True
            take = min(len(seq.tokens) - seq.computed, budget)
            plan[seq] = take
            budget -= take
        for seq in prefilling:               # what the admitted left goes back to the prefills
            if budget <= 0:
                break
            if seq.running:
                budget -= self._take(seq, budget, plan)
        return self._batch(plan) if plan else None

    def complete(self, plan: Plan) -> None:
        """The step ran: its tokens' KV is in the pool; full blocks join the prefix cache."""
        size = self.pool.block_size
        for seq, take in plan.chunks:
            seq.computed += take
            while len(seq.keys) < seq.computed // size:
                i = len(seq.keys)
                parent = seq.keys[-1] if seq.keys else ROOT
                seq.keys.append(self.pool.commit(seq.blocks[i], parent, seq.tokens[i * size:(i + 1) * size]))

    # -- internals -------------------------------------------------------------------------------

    def _take(self, seq: Sequence, limit: int, plan: dict[Sequence, int]) -> int:
        """Plan up to ``limit`` more of ``seq``'s tokens in this step, with the blocks they need
        (taking them may preempt later sequences, whose planned tokens leave the plan, ``seq``
        itself last). Returns how many tokens the step gained (negative if it lost some)."""
        planned = plan.get(seq, 0)
        take = min(len(seq.tokens) - seq.computed - planned, limit)
        if take <= 0:
            return 0
        refund = self._grow(seq, seq.computed + planned + take, plan)
        if not seq.running:                  # it preempted itself: the refund holds its tokens
            return -refund
        plan[seq] = planned + take
        return take - refund

    def _grow(self, seq: Sequence, upto: int, plan: dict[Sequence, int]) -> int:
        """Blocks for ``seq``'s positions below ``upto``, preempting the most recently admitted
        sequences (``seq`` itself last) while none is left. Returns the budget given back by
        preempted sequences already in the plan."""
        refund = 0
        while len(seq.blocks) < -(-upto // self.pool.block_size):
            block = self.pool.allocate()
            if block is not None:
                seq.blocks.append(block)
                continue
            victim = self.running[-1]
            refund += plan.pop(victim, 0)
            self._preempt(victim)
            if victim is seq:
                break
        return refund

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.running = False
        self._drop_blocks(seq)
        seq.preemptions += 1
        self.preempted += 1
        self.waiting.appendleft(seq)

    def _drop_blocks(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.keys, seq.computed = [], [], 0

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Give a waiting sequence its cached prefix and the blocks of its first chunk, if the
        pool has them; False (holding nothing) if not, or if it waits for its leader's prefill."""
        leader = seq.leader
        if leader is not None and not leader.done and leader.computed < leader.prompt_len:
            return False
        # At least the last token is computed (its logits are needed), so never hit all of them.
        hits, keys = self.pool.lookup(seq.tokens, len(seq.tokens) - 1)
        seq.blocks, seq.keys, seq.computed = hits, keys, len(hits) * self.pool.block_size
        take = min(len(seq.tokens) - seq.computed, budget)
        need = -(-(seq.computed + take) // self.pool.block_size) - len(seq.blocks)
        if need > self.pool.available:
            self._drop_blocks(seq)
            return False
        for _ in range(need):
            seq.blocks.append(self.pool.allocate())
        if seq.preemptions == 0:
            seq.cached = seq.computed
            self.prefix_query_tokens += seq.prompt_len
            self.prefix_hit_tokens += seq.computed
        return True

    def _batch(self, plan: dict[Sequence, int]) -> Plan:
        chunks = list(plan.items())
        tokens, positions, seq_index, rows, sampled = [], [], [], [], []
        tables = np.zeros((len(chunks), self.width), np.int64)
        at = 0
        for i, (seq, take) in enumerate(chunks):
            start = seq.computed
            tokens.extend(seq.tokens[start:start + take])
            positions.append(np.arange(start, start + take, dtype=np.int64))
            seq_index.append(np.full(take, i, np.int64))
            tables[i, :len(seq.blocks)] = seq.blocks
            at += take
            if start + take == len(seq.tokens):
                rows.append(at - 1)
                sampled.append(seq)
        batch = abi.Batch(np.asarray(tokens, np.int64), np.concatenate(positions), np.concatenate(seq_index),
                          tables, np.asarray(rows or [at - 1], np.int64))
        return Plan(batch, chunks, sampled)
