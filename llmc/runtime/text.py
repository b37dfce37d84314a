"""New tokens as text: an incremental detokenizer that holds back what may still change (an
incomplete UTF-8 sequence, a tail that could grow into a stop string) and cuts at the first stop
string. ``Model.generate`` and the engine share it, so a request's text is the same either way."""

from __future__ import annotations

from typing import Sequence

from llmc.errors import LlmcError


def check_stops(stop) -> list[str]:
    """``stop`` as a list of non-empty strings (None, one string, or a list of them)."""
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise LlmcError(f"stop must be a string or a list of strings, not {stop!r}")
    if any(s == "" for s in stops):
        raise LlmcError("a stop string must not be empty")
    return list(stops)


class TextStream:
    """Feed token ids with ``push``; each call returns the text that became final. ``stopped`` is
    set once a stop string appeared (the text before it has been returned; nothing after)."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for the rest
            return ""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut])
        return self._emit(text[: len(text) - self.hold])

    def finish(self) -> str:
        """What is left once generation ends without a stop string."""
        return "" if self.stopped else self._emit(self.tokenizer.decode(self.tokens))

    def _emit(self, ready: str) -> str:
        if len(ready) <= len(self.emitted):
            return ""
        piece = ready[len(self.emitted):]
        self.emitted = ready
        return piece
