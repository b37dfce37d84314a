"""What passes know beyond the graph: the model config, options, and the compile report's notes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassContext:
    config: dict = field(default_factory=dict)   # the model's Hugging Face config ({} if none)
    max_seq: int = 4096                          # the longest sequence the trace admits
    all_logits: bool = False                     # keep logits for every position, not just the last
    notes: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        """Something the compile report must say (a pass that could not apply, and why)."""
        self.notes.append(message)
