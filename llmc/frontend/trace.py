"""Trace a causal LM's own forward with torch.export: ``input_ids[1, seq] -> logits``."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import traceback

import torch

from llmc.errors import TraceError

SEQ = "seq"


class LogitsOnly(torch.nn.Module):
    """Calls the model on token ids alone and returns its logits tensor (no KV cache)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.hf = hasattr(model, "config") and hasattr(model, "can_generate")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=False) if self.hf else self.model(input_ids)
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


def export(model: torch.nn.Module, max_seq: int, name: str) -> torch.export.ExportedProgram:
    """torch.export of ``model`` with a dynamic sequence length in [1, max_seq]."""
    example_len = min(8, max_seq)
    ids = torch.zeros((1, example_len), dtype=torch.long)
    seq = torch.export.Dim(SEQ, min=1, max=max_seq) if max_seq > 1 else None
    wrapper = LogitsOnly(model).eval()
    try:
        with torch.no_grad(), _quiet_torch_logs(), _traceable_experts(model), _rotary_for_context(model, max_seq):
            return torch.export.export(wrapper, (ids,), dynamic_shapes={"input_ids": {1: seq}} if seq else None,
                                       strict=False)
    except Exception as exc:  # torch raises many unrelated types; all mean "could not trace"
        raise TraceError(f"torch.export could not trace {name}: {_summary(exc)}{_model_frame(exc)}") from exc


@contextlib.contextmanager
def _traceable_experts(model: torch.nn.Module):
    """transformers' mixture-of-experts blocks pick their experts' code by
    ``config._experts_implementation``: the default sorts tokens by expert into an opaque custom op,
    and "eager" loops over the experts a batch hit (a branch on the data). "batched_mm" gathers each
    (token, choice) pair's expert weights and multiplies them in one batched matmul: plain ATen ops
    that trace, from which llmc's moe pass recovers the routing (llmc.passes.moe)."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if c is not None and getattr(c, "_experts_implementation", None) is not None}
    before = {key: c._experts_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation = "batched_mm"
        yield
    finally:
        for key, c in configs.items():
            c._experts_implementation = before[key]


@contextlib.contextmanager
def _rotary_for_context(model: torch.nn.Module, max_seq: int):
    """transformers chooses LongRoPE's factors and dynamic NTK's base by the longest position of each
    call (a data-dependent branch, and state in the module). An artifact fixes them for its context,
    as vLLM does for ``max_model_len``: the frequencies transformers uses for a sequence of
    ``max_seq`` tokens. They equal transformers' for every sequence when ``max_seq`` is within the
    trained positions, and for the sequences past them otherwise (llmc.frontend.rotary_note says
    which). Each rotary module of such a type traces as a plain one over those frequencies."""
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:
        ROPE_INIT_FUNCTIONS = {}
    fixed = []
    try:
        for module in model.modules():
            kind = getattr(module, "rope_type", None)
            buffer = getattr(module, "inv_freq", None)
            if not (isinstance(kind, str) and ("dynamic" in kind or kind == "longrope") and kind in ROPE_INIT_FUNCTIONS
                    and isinstance(buffer, torch.Tensor) and hasattr(module, "config")):
                continue
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](module.config, buffer.device, seq_len=max_seq)
            fixed.append((module, kind, buffer, module.__dict__.get("attention_scaling", fixed)))
            # a new tensor, not a copy into the buffer: the exported program keeps the buffer it saw
            module.inv_freq = inv_freq.to(buffer.dtype)
            module.attention_scaling = scaling
            module.rope_type = "default"       # transformers' update decorator leaves a default rope alone
        yield
    finally:
        for module, kind, buffer, scaling in fixed:
            module.inv_freq = buffer
            module.rope_type = kind
            if scaling is fixed:               # it had none
                del module.attention_scaling
            else:
                module.attention_scaling = scaling


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch logs (and on failure prints) while tracing; llmc reports failures itself, in one line."""
    # torch sets levels on its own child loggers, so only a global switch silences them all.
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _summary(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _model_frame(exc: Exception) -> str:
    """' at file:line: code' for the innermost frame of the model's code (not torch's, not llmc's)."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    frames = traceback.extract_tb(exc.__traceback__)
    model_frames = [f for f in frames if not f.filename.startswith(skip) and "<" not in f.filename]
    if not model_frames:
        return ""
    frame = model_frames[-1]
    return f" (at {frame.filename}:{frame.lineno}: {(frame.line or '').strip()})"
