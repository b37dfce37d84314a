"""What a cpu library was built for, carried inside it, checked against the manifest before it runs.

The generated code has every size baked in: its weights (count, order, bytes), its activation
arena, its KV pool tensors, its vocabulary and the most tokens a call takes. The executor hands
it buffers sized by the manifest. A manifest edited out of step with the code (its digest
recomputed, so the file's checksums still match) would make the code read and write past those
buffers. So the build writes those sizes into the library as one JSON string (the exported
``llmc_expects``), found in the code section's bytes without loading it, and the loader and
``llmc verify`` refuse an artifact whose manifest says otherwise: the code's bytes are covered
by their section checksum, the manifest's values are only consistent if they agree with it.
"""

from __future__ import annotations

import json
from typing import Any

from llmc.artifact import ArtifactError
from llmc.manifest import ManifestError, check_dict, check_int, check_list, check_str

MARK = b"llmc-expects:"


def c_declaration(expects: dict[str, Any]) -> str:
    """The C line that carries ``expects`` in the library."""
    text = json.dumps(expects, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"LLMC_EXPORT const char llmc_expects[] = {json.dumps(MARK.decode() + text)};"


def expects_of(graphs: dict, weight_names: list[str], arena_bytes: int, chunk: int,
               functions: dict[str, str]) -> dict[str, Any]:
    """The record for a library lowered from ``graphs`` (entry -> step graph; the kernel tests
    lower other graphs too, whose record no artifact carries)."""
    from llmc.abi import BATCH_INPUTS

    step = next(iter(graphs.values()))
    types = {n.attrs["name"]: n.type for graph in graphs.values() for n in graph.nodes() if n.op == "weight"}
    return {
        "functions": dict(functions), "chunk": int(chunk), "arena_bytes": int(arena_bytes),
        "vocab": vocab if isinstance(vocab := step.outputs[0].type.shape[-1], int) else None,
        "pool": [[n.attrs["name"], str(n.type)] for n in step.inputs[len(BATCH_INPUTS):]],
        "weights": [[name, types[name].dtype, [int(d) for d in types[name].shape]] for name in weight_names],
    }


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
    expects = read_expects(code, path)
    tensors = manifest.get("tensors", {})
    entry = manifest["entry_points"]["step"]
    checks = [
        ("its entry functions", target["functions"], expects["functions"]),
        ("its vocabulary", manifest["vocab_size"], expects["vocab"]),
        ("the most tokens a call takes (target.chunk)", target["chunk"], expects["chunk"]),
        ("the most tokens a call takes (entry_points.step.max_tokens)", entry["max_tokens"], expects["chunk"]),
        ("its activation arena (target.arena_bytes)", target["arena_bytes"], expects["arena_bytes"]),
        ("its KV pool tensors", [list(t) for t in manifest["kv_pool"]["tensors"]], expects["pool"]),
        ("the weights it reads, in order (target.weights)", target["weights"], [w[0] for w in expects["weights"]]),
    ]
    for name, dtype, shape in expects["weights"]:
        t = tensors.get(name)
        said = None if t is None else [t["dtype"], t["shape"]]
        checks.append((f"weight {name}", said, [dtype, shape]))
    for what, said, built in checks:
        if said != built:
            raise ArtifactError(f"{path}: its manifest does not match its compiled library in {what}: the manifest "
                                f"says {_short(said)}, the library was built for {_short(built)}. A tool edited the "
                                "manifest; rebuild the artifact")
    return expects


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
