"""``llmc verify``: is an artifact intact, and what was it built from?

Every section's checksum is checked and the manifest validated as loading does (its schema, its
sections and tensors, the entry point, and what the target's code was built for), and the
manifest's record of the build is reported: the input files' hashes, the llmc version, the
target and what it needs to run, the quantization scheme and the options. Whether it can run on this machine is reported, not
required: a CI runner verifies artifacts built for other machines.
"""

from __future__ import annotations

from pathlib import Path

from llmc.artifact import read_artifact, sha256_file


def verify_artifact(path: str | Path) -> dict:
    """What ``llmc verify --json`` prints for one file; raises ArtifactError if it is damaged (AbiError,
    one of them, if its entry point is not the one this llmc calls)."""
    from llmc import abi
    from llmc.targets import target_of

    art = read_artifact(path, verify=True, machine=False)
    try:
        m = art.manifest
        target = target_of(m, art.path)
        entry = abi.check_manifest(m, art.path)
        target.check_artifact(art)
        runs_here, why = target.runs_here(m)
        pool = m["kv_pool"]
        return {
            "path": str(path), "ok": True, "sha256": sha256_file(path), "bytes": Path(path).stat().st_size,
            "format_version": m["format_version"], "llmc_version": m.get("llmc_version"),
            # The target entry's scalars (name, executor, level, chunk, ...); its tables stay in the file.
            "target": {k: v for k, v in m["target"].items() if isinstance(v, (str, int, float, bool))},
            "target_lines": target.describe(art),
            "requires": m.get("requires", {}), "runs_here": runs_here, "runs_here_note": why,
            "model": {key: m["model"].get(key) for key in ("source", "kind", "max_seq")},
            "inputs": m.get("inputs", {}), "quantization": m.get("quantization"),
            "kv_cache": pool["dtype"], "kv_block_size": pool["block_size"], "max_tokens": entry["max_tokens"],
            "calibration": m.get("calibration"), "options": m.get("options"),
            "sections": {name: {"size": s["size"], "sha256": s["sha256"]} for name, s in m["sections"].items()},
        }
    finally:
        art.close()


def describe_requirements(manifest: dict) -> str:
    """What an artifact needs to run, from its ``requires`` (e.g. cpu_features, cuda_arches)."""
    needs = [f"{key.replace('_', ' ')} {', '.join(map(str, value))}"
             for key, value in sorted(manifest.get("requires", {}).items()) if value]
    return "; ".join(needs) or "nothing beyond numpy"


def format_result(result: dict) -> str:
    t = result["target"]
    lines = [f"ok        {result['path']}: {len(result['sections'])} sections, every checksum matches "
             f"({result['bytes'] / 1e6:.1f} MB, sha256 {result['sha256']})",
             f"built by  llmc {result['llmc_version']} (artifact format {result['format_version']})",
             f"target    {t['name']}: {t.get('executor', '')}"]
    lines += result["target_lines"]
    lines += [f"quant     {result['quantization']}, KV cache {result['kv_cache']} in blocks of "
              f"{result['kv_block_size']}, up to {result['max_tokens']} tokens a step",
              f"model     {result['model']['source']} ({result['model']['kind']}), context {result['model']['max_seq']}"]
    for name, digest in sorted(result["inputs"].items()):
        lines.append(f"input     {name} sha256 {digest}")
    if result.get("calibration"):
        c = result["calibration"]
        lines.append(f"calib     {c['text']} ({c['tokens']} tokens{', sha256 ' + c['sha256'] if c.get('sha256') else ''})")
    if result.get("options"):
        given = ", ".join(f"{k}={v}" for k, v in sorted(result["options"].items()) if v is not None)
        lines.append(f"options   {given}")
    lines.append(f"requires  {describe_requirements(result)}"
                 + ("" if result["runs_here"] is None else "; runs here" if result["runs_here"] else "; NOT on this machine")
                 + (f" ({result['runs_here_note']})" if result["runs_here_note"] else ""))
    return "\n".join(lines) + "\n"
