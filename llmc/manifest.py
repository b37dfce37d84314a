"""What an artifact's manifest must hold, checked before anything reads it.

The header's sha256 says the manifest is the bytes that were written; it does not say a tool
that edited the JSON and recomputed the digest kept it consistent. So every value the runtime
reads is checked here for its type and range, and against the file: every section inside the
file, page-aligned and apart from the others; every tensor inside the weights section, aligned,
apart from the others, in the order of the names, and exactly as many bytes as its dtype and
shape need (``check_container``, which every llmc file passes as it is read); then the
artifact's own fields (``check_model``, with the entry point's checks). What the compiled
code itself expects (its weights, arena, pool, vocabulary) is the target's check
(``Target.check_artifact``). A manifest that fails is an ArtifactError naming the field; nothing
native has run. Imports the core only.
"""

from __future__ import annotations

import re
from typing import Any

from llmc.errors import is_int

LIMIT = 2 ** 48            # no size, offset, count or dimension of a real artifact comes near
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(Exception):
    """A field that is not what it must be: ``where`` names it (``tensors.x.offset``)."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where} {what}")


def check_int(value: Any, where: str, low: int = 0, high: int = LIMIT) -> int:
    if not is_int(value) or not low <= value <= high:
        raise ManifestError(where, f"must be an int from {low} to {high}, not {_show(value)}")
    return int(value)


def check_str(value: Any, where: str, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise ManifestError(where, f"must be a{'' if empty else ' non-empty'} string, not {_show(value)}")
    return value


def check_dict(value: Any, where: str, keys: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        raise ManifestError(where, f"must be an object, not {_show(value)}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ManifestError(where, f"lacks {', '.join(missing)}")
    return value


def check_list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ManifestError(where, f"must be a list, not {_show(value)}")
    return value


def check_optional(value: Any, where: str, check) -> Any:
    return None if value is None else check(value, where)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_container(manifest: Any, file_size: int, manifest_end: int, format_version: int) -> None:
    """Raise ManifestError for the first field of the container's part of ``manifest`` (the
    decoded JSON of a file of ``file_size`` bytes whose manifest ends at ``manifest_end``): its
    format version, sections, tensors and the machine it needs (what reading checks). Every llmc
    file has these (artifacts, import cache entries)."""
    from llmc.artifact import SECTION_ALIGN

    check_dict(manifest, "the manifest", ("format_version", "sections"))
    if manifest["format_version"] != format_version:
        raise ManifestError("format_version", f"must be {format_version} (the header's), not "
                                              f"{_show(manifest['format_version'])}")
    sections = check_dict(manifest["sections"], "sections")
    spans = []
    for name, entry in sections.items():
        where = f"sections.{name}"
        check_dict(entry, where, ("offset", "size", "sha256"))
        offset = check_int(entry["offset"], f"{where}.offset", manifest_end, file_size)
        size = check_int(entry["size"], f"{where}.size", 0, file_size - offset)
        if offset % SECTION_ALIGN:
            raise ManifestError(f"{where}.offset", f"must be a multiple of {SECTION_ALIGN}, not {offset}")
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            raise ManifestError(f"{where}.sha256", "must be 64 lowercase hex digits")
        spans.append((offset, offset + size, where))
    _apart(spans)
    tensors = check_dict(manifest.get("tensors", {}), "tensors")
    if tensors:
        if "weights" not in sections:
            raise ManifestError("sections", "lack the weights section its tensors are in")
        check_tensors(tensors, sections["weights"]["size"])
    requires = check_dict(manifest.get("requires", {}), "requires")
    for key, values in requires.items():
        for i, value in enumerate(check_list(values, f"requires.{key}")):
            check_str(value, f"requires.{key}.{i}")


def check_model(manifest: dict) -> None:
    """Raise ManifestError for the first field of an artifact's own part of ``manifest`` that the
    runtime, ``llmc verify`` or ``llmc inspect`` reads and is not what it must be (the vocabulary,
    the model's positions, the target's name, the end tokens, the tokenizer, the build's record)."""
    check_dict(manifest, "the manifest", ("vocab_size", "model", "target", "entry_points", "kv_pool"))
    check_int(manifest["vocab_size"], "vocab_size", 1, 2 ** 31 - 1)
    model = check_dict(manifest["model"], "model", ("max_seq",))
    check_int(model["max_seq"], "model.max_seq", 1, 2 ** 31 - 1)
    check_dict(manifest["target"], "target", ("name",))
    check_str(manifest["target"]["name"], "target.name")
    # End and begin tokens may lie past the vocabulary (tiny test configs keep their family's ids):
    # never generated, and a step refuses a token outside it.
    for i, token in enumerate(check_list(manifest.get("eos_token_ids", []), "eos_token_ids")):
        check_int(token, f"eos_token_ids.{i}", 0, 2 ** 31 - 1)
    check_provenance(manifest)
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None:
        check_tokenizer(tokenizer)
        if "tokenizer" not in manifest["sections"]:
            raise ManifestError("sections", "lack the tokenizer section the manifest's tokenizer describes")


def check_provenance(manifest: dict) -> None:
    """What ``llmc verify`` and ``llmc inspect`` report of how the artifact was built."""
    def text(value, where):
        return check_str(value, where, empty=True)

    for key in ("llmc_version", "quantization"):
        check_optional(manifest.get(key), key, text)
    for key in ("source", "kind"):
        check_optional(manifest["model"].get(key), f"model.{key}", text)
    check_optional(manifest["model"].get("config"), "model.config", check_dict)
    for name, digest in (check_optional(manifest.get("inputs"), "inputs", check_dict) or {}).items():
        text(digest, f"inputs.{name}")
    for name, value in (check_optional(manifest.get("options"), "options", check_dict) or {}).items():
        if not isinstance(value, (str, int, float, bool, type(None))):
            raise ManifestError(f"options.{name}", f"must be a string, number or null, not {_show(value)}")
    calibration = check_optional(manifest.get("calibration"), "calibration",
                                 lambda v, w: check_dict(v, w, ("text", "tokens")))
    if calibration:
        text(calibration["text"], "calibration.text")
        check_int(calibration["tokens"], "calibration.tokens")
        check_optional(calibration.get("sha256"), "calibration.sha256", text)
    for i, note in enumerate(check_optional(manifest.get("notes"), "notes", check_list) or []):
        text(note, f"notes.{i}")


def check_tensors(tensors: dict, weights_size: int) -> None:
    """Every tensor: a known dtype, a shape of ints, ``nbytes`` what they need, at an aligned
    offset inside the weights section, apart from the others."""
    from llmc.artifact import TENSOR_ALIGN
    from llmc.types import DTYPE_BYTES, DTYPES

    spans = []
    for name, t in tensors.items():
        where = f"tensors.{name}"
        check_dict(t, where, ("dtype", "shape", "offset", "nbytes"))
        if t["dtype"] not in DTYPES:
            raise ManifestError(f"{where}.dtype", f"must be one of {', '.join(DTYPES)}, not {_show(t['dtype'])}")
        count = 1
        for i, d in enumerate(check_list(t["shape"], f"{where}.shape")):
            count *= check_int(d, f"{where}.shape.{i}", 0, LIMIT)
        need = count * DTYPE_BYTES[t["dtype"]]
        if t["nbytes"] != need or not is_int(t["nbytes"]):
            raise ManifestError(f"{where}.nbytes",
                                f"must be {need} ({t['dtype']}{t['shape']}), not {_show(t['nbytes'])}")
        offset = check_int(t["offset"], f"{where}.offset", 0, weights_size)
        if offset % TENSOR_ALIGN:
            raise ManifestError(f"{where}.offset", f"must be a multiple of {TENSOR_ALIGN}, not {offset}")
        if offset + need > weights_size:
            raise ManifestError(where, f"ends at byte {offset + need}, past the weights section's {weights_size}")
        spans.append((offset, offset + need, where))
    _apart(spans)
    # The writer lays tensors out in the order of their names (llmc.artifact.pack_weights), so two
    # tensors of one size whose offsets were swapped are found, not read as each other.
    placed = [where for start, end, where in sorted(spans) if end > start]
    if placed != sorted(placed):
        first = next(a for a, b in zip(placed, sorted(placed)) if a != b)
        raise ManifestError(first, "is out of place: tensors lie in the weights section in the order of their names")


def check_tokenizer(tokenizer: Any) -> None:
    check_dict(tokenizer, "tokenizer")
    for key in ("bos_token_id",):
        check_optional(tokenizer.get(key), f"tokenizer.{key}", lambda v, w: check_int(v, w, 0, 2 ** 31 - 1))
    for i, token in enumerate(check_list(tokenizer.get("eos_token_ids") or [], "tokenizer.eos_token_ids")):
        check_int(token, f"tokenizer.eos_token_ids.{i}", 0, 2 ** 31 - 1)
    for key in ("bos_token", "eos_token", "chat_template"):
        check_optional(tokenizer.get(key), f"tokenizer.{key}", lambda v, w: check_str(v, w, empty=True))
    if not isinstance(tokenizer.get("add_bos_token", False), bool):
        raise ManifestError("tokenizer.add_bos_token",
                            f"must be true or false, not {_show(tokenizer['add_bos_token'])}")


def _apart(spans: list[tuple[int, int, str]]) -> None:
    """No two [start, end) spans overlap (empty ones never do)."""
    spans = sorted(s for s in spans if s[1] > s[0])
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ManifestError(second, f"overlaps {first}")

