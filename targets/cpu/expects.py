"""What a cpu library was built for (targets/expects.py), carried inside it: one JSON string, the
exported ``llmc_expects``, found in the code section's bytes without loading the library, so
``llmc verify`` checks it on any machine. Beyond the common record: the entry functions and the
activation arena, which the executor sizes from the manifest.
"""

from __future__ import annotations

import json
from typing import Any

from llmc.artifact import ArtifactError
from llmc.manifest import ManifestError, check_dict, check_int, check_list, check_str

from ..expects import compare, record, require

MARK = b"llmc-expects:"


def c_declaration(expects: dict[str, Any]) -> str:
    """The C that carries ``expects`` in the library: the record as a string, and
    ``llmc_check_buffers``, which the executor calls with the sizes of the buffers it made before
    the first step (the code checks what it is given, not only Python)."""
    from llmc import dims
    from llmc.abi import block_bytes
    from llmc.types import DTYPE_BYTES, parse_type

    text = json.dumps(expects, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    weights = [DTYPE_BYTES[dtype] * dims.product(shape) for _, dtype, shape in expects["weights"]]
    pool = []
    for name, type_text in expects["pool"]:
        t = parse_type(type_text)
        pool.append(block_bytes(name, t, t.dtype))

    def table(name, values):
        return f"static const int64_t {name}[{max(len(values), 1)}] = {{{', '.join(map(str, values)) or '0'}}};"

    return "\n".join([
        f"LLMC_EXPORT const char llmc_expects[] = {json.dumps(MARK.decode() + text)};",
        table("llmc_weight_bytes", weights),
        table("llmc_pool_block_bytes", pool),
        "/* 0 when the buffers the executor made are the ones this code was built for: as many weights",
        "   and pool tensors, each at least as large (pool tensors per block), the arena at least",
        "   arena_bytes, the logits' rows exactly vocab wide */",
        "LLMC_EXPORT int llmc_check_buffers(int64_t weights, const int64_t* weight_bytes, int64_t caches,",
        "                                   const int64_t* cache_block_bytes, int64_t arena, int64_t vocab) {",
        f"  if (weights != {len(weights)} || caches != {len(pool)} || arena < {expects['arena_bytes']}"
        f" || vocab != {expects['vocab'] if expects['vocab'] is not None else -1}) return 1;",
        "  for (int64_t i = 0; i < weights; i++) if (weight_bytes[i] < llmc_weight_bytes[i]) return 1;",
        "  for (int64_t i = 0; i < caches; i++) if (cache_block_bytes[i] < llmc_pool_block_bytes[i]) return 1;",
        "  return 0;",
        "}"])


def expects_of(graphs: dict, weight_names: list[str], arena_bytes: int, chunk: int,
               functions: dict[str, str]) -> dict[str, Any]:
    """The record for a library lowered from ``graphs`` (entry -> step graph)."""
    return {**record(next(iter(graphs.values())), weight_names), "functions": dict(functions),
            "max_tokens": int(chunk), "arena_bytes": int(arena_bytes)}


def read_expects(code: bytes, path) -> dict[str, Any]:
    """The record inside a library's bytes; an ArtifactError when it has none (an older build)."""
    at = code.find(MARK)
    if at < 0 or code.find(MARK, at + 1) >= 0:
        raise ArtifactError(f"{path}: its cpu library carries no record of what it was built for (an older llmc "
                            "built it): rebuild the artifact with this llmc")
    end = code.find(b"\0", at)
    try:
        return json.loads(code[at + len(MARK): end].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: its cpu library's record of what it was built for does not read; "
                            "rebuild the artifact") from None


def check_against_library(manifest: dict[str, Any], code: bytes, path) -> dict[str, Any]:
    """The manifest's cpu target entry, checked for its types and against the library's record;
    an ArtifactError naming the first difference."""
    target = manifest["target"]
    try:
        check_dict(target, "target", ("level", "chunk", "arena_bytes", "functions", "weights", "kernels"))
        check_str(target["level"], "target.level")
        for i, name in enumerate(check_list(target["weights"], "target.weights")):
            check_str(name, f"target.weights.{i}")
        for key in ("kernels", "layouts"):
            for name, value in check_dict(target.get(key, {}), f"target.{key}").items():
                (check_int if key == "kernels" else check_str)(value, f"target.{key}.{name}")
        check_dict(target["functions"], "target.functions")
    except ManifestError as exc:
        raise ArtifactError(f"{path} has a manifest that is not valid: {exc}; rebuild the artifact") from None
    expects = require(read_expects(code, path), ("functions", "arena_bytes"), path)
    compare(manifest, expects, target["weights"], path, [
        ("its entry functions", target["functions"], expects["functions"]),
        ("the most tokens a call takes (target.chunk)", target["chunk"], expects["max_tokens"]),
        ("its activation arena (target.arena_bytes)", target["arena_bytes"], expects["arena_bytes"])])
    return expects
