"""What the runtime needs to speak text: the tokenizer as Hugging Face ``tokenizers`` JSON, the
chat template, and the special tokens. Read from a model directory or from GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from llmc.errors import SourceError
from llmc.frontend.sources import ONNX, ModelSource


@dataclass
class TokenizerInfo:
    tokenizer_json: str | None = None
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    add_bos_token: bool = False

    def manifest(self) -> dict[str, Any]:
        """Everything but the tokenizer JSON itself (that goes into its own section)."""
        out = asdict(self)
        del out["tokenizer_json"]
        return out


def tokenizer_info(source: ModelSource, config: dict) -> TokenizerInfo:
    if source.kind == "hf" and source.has_tokenizer:
        return _from_directory(source.path)
    if source.kind == ONNX and source.has_tokenizer:
        return _from_directory(source.path.parent)
    if source.kind == "gguf" and source.has_tokenizer:
        return _from_gguf(source)
    eos = config.get("eos_token_id")
    return TokenizerInfo(eos_token_ids=_ids(eos), bos_token_id=config.get("bos_token_id"))


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _fast_tokenizer(load):
    try:
        tokenizer = load()
    except Exception as exc:
        raise SourceError(f"cannot read the tokenizer: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SourceError("the tokenizer has no Hugging Face tokenizers (fast) form that llmc can store")
    return tokenizer, backend.to_str()


def _token_text(token) -> str | None:
    return token if isinstance(token, str) or token is None else getattr(token, "content", str(token))


def _from_directory(path) -> TokenizerInfo:
    from transformers import AutoTokenizer

    tokenizer, text = _fast_tokenizer(lambda: AutoTokenizer.from_pretrained(path, local_files_only=True))
    config_path = path / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    eos_ids = _ids(config.get("eos_token_id")) or _ids(tokenizer.eos_token_id)
    return TokenizerInfo(text, getattr(tokenizer, "chat_template", None), _token_text(tokenizer.bos_token),
                         _token_text(tokenizer.eos_token), tokenizer.bos_token_id, eos_ids,
                         bool(getattr(tokenizer, "add_bos_token", False)))


def _from_gguf(source: ModelSource) -> TokenizerInfo:
    from transformers import AutoTokenizer

    from llmc.frontend.gguf_file import GGUFFile

    path = source.path
    meta = GGUFFile(path).metadata
    tokenizer, text = _fast_tokenizer(
        lambda: AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True))
    tokens = meta.get("tokenizer.ggml.tokens", [])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return TokenizerInfo(text, meta.get("tokenizer.chat_template"),
                         tokens[bos] if bos is not None and bos < len(tokens) else None,
                         tokens[eos] if eos is not None and eos < len(tokens) else None,
                         bos, _ids(eos), bool(meta.get("tokenizer.ggml.add_bos_token", False)))
