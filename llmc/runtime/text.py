"""New tokens as text: an incremental detokenizer that holds back what may still change (an
incomplete UTF-8 sequence, a tail that could grow into a stop string) and cuts at the first stop
string. ``Model.generate`` and the engine share it, so a request's text is the same either way."""

from __future__ import annotations

from typing import Sequence

from llmc.errors import UsageError


def check_stops(stop) -> list[str]:
    """``stop`` as a list of non-empty strings (None, one string, or a list of them)."""
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise UsageError(f"stop must be a string or a list of strings, not {stop!r}")
    if any(s == "" for s in stops):
        raise UsageError("a stop string must not be empty")
    return list(stops)


class TextStream:
    """Feed token ids with ``push``; each call returns the text that became final. ``stopped`` is
    set once a stop string appeared (the text before it has been returned; nothing after).

    Constant work per token, however long the output: only a short window of tokens is decoded
    (the ones read last time, as context, so that a decoder that treats a leading space or a byte
    sequence differently at the start of a text sees them as it would in the whole text; then the
    new ones), and only the text not yet returned is kept and searched for stop strings (returned
    text holds none, nor the start of one: the last ``hold`` characters are always kept back).
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.tokens: list[int] = []         # the window: tokens[:_read] were decoded last time
        self.pending = ""                   # decoded, not yet returned
        self.stopped = False
        self._read = 0

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        new = self._decode_new()
        if not new:
            return ""                       # an incomplete UTF-8 sequence, or nothing printable yet
        # A stop string not found before ends in the new text, so starts at most hold before it.
        start = max(0, len(self.pending) - len(new) - self.hold)
        cut = min((i for i in (self.pending.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(cut)
        return self._emit(len(self.pending) - self.hold)

    def finish(self) -> str:
        """What is left once generation ends without a stop string."""
        if self.stopped:
            return ""
        self._decode_new(final=True)
        return self._emit(len(self.pending))

    def _decode_new(self, final: bool = False) -> str:
        """The text the tokens not yet read add (appended to ``pending``), or "" while they end in
        an incomplete UTF-8 sequence (unless ``final``)."""
        decode = self.tokenizer.decode
        before = decode(self.tokens[:self._read]) if self._read else ""
        after = decode(self.tokens)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        new = after[len(before):]
        self.pending += new
        del self.tokens[:self._read]        # what was read before this is context no longer
        self._read = len(self.tokens)
        return new

    def _emit(self, ready: int) -> str:
        if ready <= 0:
            return ""
        piece, self.pending = self.pending[:ready], self.pending[ready:]
        return piece
