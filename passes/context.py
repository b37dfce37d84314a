"""What passes know beyond the graph: the model config, options, and the compile report's notes."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmc.ir import Graph, IRError, verify


@dataclass
class PassContext:
    config: dict = field(default_factory=dict)   # the model's Hugging Face config ({} if none)
    max_seq: int = 4096                          # the longest sequence the trace admits
    block_size: int = 16                         # tokens per KV pool block (llmc.abi.DEFAULT_BLOCK_SIZE)
    notes: list[str] = field(default_factory=list)
    verify: bool = False                         # run the verifier after every pass (tests, LLMC_VERIFY=1)
    quant: str = "f32"                           # the weight quantization scheme (llmc.quant)
    source: object = None                        # the model source (llmc.frontend.sources.ModelSource)
    kv: str = "f32"                              # KV cache storage: f32, f16 (of an f32 model), or int8
                                                 # with a scale per head and position
    calibration: object = None                   # token ids of a calibration text (numpy), for AWQ-style scales

    def after(self, name: str, graph: Graph) -> Graph:
        """Call after each pass: with verification on, a pass that breaks the graph fails here, by name."""
        if self.verify:
            try:
                verify(graph)
            except IRError as exc:
                raise IRError(f"after pass {name}: {exc}") from None
        return graph

    def note(self, message: str) -> None:
        """Something the compile report must say (a pass that could not apply, and why)."""
        self.notes.append(message)
