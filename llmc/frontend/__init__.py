"""The front end: a model source -> its own PyTorch code traced by torch.export -> llmc IR (or an
ONNX decoder -> llmc IR, by llmc.frontend.onnx_model)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmc.errors import UnsupportedModelError
from llmc.frontend.sources import ONNX, ModelSource, resolve
from llmc.ir import Graph, verify

DEFAULT_MAX_SEQ = 4096


@dataclass
class Imported:
    graph: Graph
    source: ModelSource
    config: dict                       # the Hugging Face config as a dict ({} for a plain nn.Module)
    max_seq: int                       # the longest sequence the trace admits
    timings: dict[str, float] = field(default_factory=dict)
    cached: bool = False               # read from the build cache (llmc.frontend.stored), not traced now
    tokenizer: Any = None              # llmc.frontend.tokenizer.TokenizerInfo, once read
    copied: bool = False               # a copy of an import made once for several builds

    def copy(self) -> "Imported":
        """A copy whose graph passes may rebuild and add weights to without touching this one (the
        weight arrays themselves are shared; passes never write into them)."""
        from llmc.ir import parse_graph

        graph = parse_graph(str(self.graph), dict(self.graph.weights))
        return Imported(graph, self.source, self.config, self.max_seq, dict(self.timings), self.cached, self.tokenizer,
                        copied=True)


def last_frame(stack_trace: str) -> str | None:
    """'file:line: code' of the innermost frame of a Python stack trace as torch records one for
    a traced node (torch.export's fx nodes, torch.onnx's node metadata); None without one."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', stack_trace)
    if not frames:
        return None
    path, line, _, code = frames[-1]
    return f"{path}:{line}: {code.strip()}"


def check_context(max_seq: int | None, config: dict, spec: Any) -> None:
    """Refuse a context (``--context``) longer than the positions the model was made for (for dynamic
    NTK rotary, which stretches the trained positions, up to ``factor`` times them)."""
    from llmc.errors import UsageError

    positions = config.get("max_position_embeddings") or config.get("n_positions")
    kind, params = rotary_scaling(config)
    if positions and kind == "dynamic":
        positions = int(positions * params.get("factor", 1.0))
    if max_seq is not None and positions and max_seq > positions:
        raise UsageError(f"--context {max_seq} is beyond the {positions} positions {spec} was made for; "
                         f"give at most {positions}")


def rotary_scaling(config: dict) -> tuple[str, dict]:
    """The rotary scaling a Hugging Face config names (its ``rope_parameters`` or older
    ``rope_scaling``): ("dynamic", params), ("longrope", params), ... or ("default", {})."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        return "default", {}
    kind = params.get("rope_type") or params.get("type") or "default"
    return ("dynamic" if "dynamic" in str(kind) else str(kind)), params


def rotary_note(config: dict, max_seq: int) -> str | None:
    """What a build says of rotary frequencies that transformers chooses by the sequence's length
    (LongRoPE, dynamic NTK): an artifact fixes them for its context, as vLLM does for its
    ``max_model_len`` (llmc.frontend.trace fixes them while tracing)."""
    kind, params = rotary_scaling(config)
    if kind == "longrope":
        trained = params.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
        if trained and max_seq > trained:
            return (f"LongRoPE: the context of {max_seq} is past the trained {trained} positions, so every "
                    f"sequence uses the long factors (transformers uses the short ones for sequences of up to "
                    f"{trained}); build with --context {trained} for those")
    if kind == "dynamic":
        trained = config.get("max_position_embeddings")
        if trained and max_seq > trained:
            return (f"dynamic NTK rotary: every sequence uses the frequencies for the context of {max_seq} "
                    f"(transformers rescales them by each sequence's length, and not at all up to {trained}); "
                    f"build with --context {trained} for the trained ones")
    return None


def import_model(spec: Any, *, attn_implementation: str | None = None, max_seq: int | None = None) -> Imported:
    """Resolve ``spec``, load the model, check it is causal, trace it and import it as a verified graph
    (an ONNX source is imported as it is written, without torch)."""
    timings = {}
    start = time.perf_counter()
    source = resolve(spec, attn_implementation)
    if source.kind == ONNX:
        return _import_onnx(source, max_seq)

    import torch

    from llmc.frontend.aten import Importer
    from llmc.frontend.trace import SEQ, export

    model = source.load()
    timings["load"] = time.perf_counter() - start

    config = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
    check_context(max_seq, config, source.spec)
    if max_seq is None:
        max_seq = config.get("max_position_embeddings") or config.get("n_positions") or DEFAULT_MAX_SEQ
    check_causal(model, source.spec, _vocab_size(model, config))

    start = time.perf_counter()
    program = export(model, max_seq, source.spec)
    timings["trace"] = time.perf_counter() - start

    start = time.perf_counter()
    user_input = next(n for n in program.graph.nodes if n.op == "placeholder"
                      and n.name in program.graph_signature.user_inputs)
    size = user_input.meta["val"].shape[1]
    symbols = {str(size.node.expr): SEQ} if isinstance(size, torch.SymInt) else {}
    graph = Importer(program, symbols, weight_prefix="model.").run()
    graph.name = "forward"
    verify(graph)
    timings["import"] = time.perf_counter() - start
    return Imported(graph, source, config, int(max_seq), timings)


def _import_onnx(source: ModelSource, max_seq: int | None) -> Imported:
    """An ONNX decoder's graph (llmc.frontend.onnx_model), with the Hugging Face config.json beside
    it when there is one (the context and the special tokens come from it)."""
    import json

    from llmc.frontend.onnx_model import import_onnx, load_onnx, position_rows
    from llmc.interpret import run

    timings = {}
    start = time.perf_counter()
    model = load_onnx(source.path, source.spec)
    config_path = source.path.parent / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"cannot read {config_path} beside {source.spec}: {exc}") from None
    config = config if isinstance(config, dict) else {}
    timings["load"] = time.perf_counter() - start
    start = time.perf_counter()
    graph = import_onnx(model, source.spec)
    graph.name = "forward"
    verify(graph)
    vocab = graph.outputs[0].type.shape[-1]
    if vocab >= 2:
        ids, changed = probe_ids(vocab)
        refuse_unless_causal(run(graph, [ids])[0], run(graph, [changed])[0], source.spec)
    rows = position_rows(graph)
    if rows and not (config.get("max_position_embeddings") or config.get("n_positions")):
        config = {**config, "max_position_embeddings": rows}     # what the position table admits
    check_context(max_seq, config, source.spec)
    if max_seq is None:
        max_seq = config.get("max_position_embeddings") or config.get("n_positions") or DEFAULT_MAX_SEQ
    timings["import"] = time.perf_counter() - start
    return Imported(graph, source, config, int(max_seq), timings)


def _vocab_size(model, config: dict) -> int | None:
    import torch

    if config.get("vocab_size"):
        return int(config["vocab_size"])
    embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else None


def check_causal(model, spec: str, vocab: int | None) -> None:
    """Refuse a model whose earlier outputs change when a later token does (not a causal LM)."""
    import torch

    from llmc.frontend.trace import LogitsOnly

    if not vocab or vocab < 2:
        return
    ids, changed = probe_ids(vocab)
    wrapper = LogitsOnly(model)
    try:
        with torch.no_grad():
            a, b = wrapper(torch.from_numpy(ids)), wrapper(torch.from_numpy(changed))
    except Exception:
        return  # the trace will report what is wrong with the model's forward
    if not isinstance(a, torch.Tensor) or a.dim() != 3 or a.shape[:2] != ids.shape:
        raise UnsupportedModelError(f"{spec} does not return logits of shape [batch, seq, vocab] "
                                    f"(got {tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__})")
    refuse_unless_causal(a.float().numpy(), b.float().numpy(), spec)


def probe_ids(vocab: int, length: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [1, length] (seeded) and the same with the last one changed: the causality probe's."""
    ids = np.random.default_rng(0).integers(0, min(vocab, 1000), (1, length), dtype=np.int64)
    changed = ids.copy()
    changed[0, -1] = (ids[0, -1] + 1) % min(vocab, 1000)
    return ids, changed


def refuse_unless_causal(a: np.ndarray, b: np.ndarray, spec: str) -> None:
    """UnsupportedModelError when the logits of the probe's two inputs differ before the last token."""
    if np.abs(a[:, :-1] - b[:, :-1]).max() > 1e-5 * max(float(np.abs(a).max()), 1.0):
        raise UnsupportedModelError(f"{spec} is not a causal language model: its outputs at earlier positions "
                                    "change when a later token changes (encoder-only models are not supported)")
