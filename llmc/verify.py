"""``llmc verify``: is an artifact intact, and what was it built from?

Every section's checksum is checked (as loading does), and the manifest's record of the build is
reported: the input files' hashes, the llmc version, the target and what it needs to run, the
quantization scheme and the options. Whether it can run on this machine is reported, not
required: a CI runner verifies artifacts built for other machines.
"""

from __future__ import annotations

from pathlib import Path

from llmc.artifact import ArtifactError, check_machine, read_artifact, sha256_file


def verify_artifact(path: str | Path) -> dict:
    """What ``llmc verify --json`` prints for one file; raises ArtifactError if it is damaged."""
    art = read_artifact(path, verify=True, machine=False)
    try:
        m = art.manifest
        target = m["target"]
        requires = m.get("requires", {})
        runs_here, why = _runs_here(m, art.path)
        return {
            "path": str(path), "ok": True, "sha256": sha256_file(path), "bytes": Path(path).stat().st_size,
            "format_version": m["format_version"], "llmc_version": m.get("llmc_version"),
            "target": {key: target[key] for key in ("name", "level", "arches", "act_dtype", "chunk") if key in target},
            "requires": requires, "runs_here": runs_here, "runs_here_note": why,
            "model": {key: m["model"].get(key) for key in ("source", "kind", "max_seq")},
            "inputs": m.get("inputs", {}), "quantization": m.get("quantization"),
            "kv_cache": m["kv_cache"]["dtype"], "calibration": m.get("calibration"), "options": m.get("options"),
            "sections": {name: {"size": s["size"], "sha256": s["sha256"]} for name, s in m["sections"].items()},
        }
    finally:
        art.close()


def _runs_here(manifest: dict, path: Path) -> tuple[bool | None, str | None]:
    """(runs here, why not): None for a cuda artifact, which this check cannot answer."""
    arches = manifest.get("requires", {}).get("cuda_arches")
    if arches:
        return None, "needs an NVIDIA GPU of " + " or ".join(arches)
    try:
        check_machine(manifest, path)
    except ArtifactError as exc:
        return False, str(exc)
    return True, None


def format_result(result: dict) -> str:
    t = result["target"]
    where = {"cpu": f" {t.get('level', '')}", "cuda": f" {','.join(t.get('arches', []))}"}.get(t["name"], "")
    lines = [f"ok        {result['path']}: {len(result['sections'])} sections, every checksum matches "
             f"({result['bytes'] / 1e6:.1f} MB, sha256 {result['sha256']})",
             f"built by  llmc {result['llmc_version']} (artifact format {result['format_version']})",
             f"target    {t['name']}{where}",
             f"quant     {result['quantization']}, KV cache {result['kv_cache']}",
             f"model     {result['model']['source']} ({result['model']['kind']}), context {result['model']['max_seq']}"]
    for name, digest in sorted(result["inputs"].items()):
        lines.append(f"input     {name} sha256 {digest}")
    if result.get("calibration"):
        c = result["calibration"]
        lines.append(f"calib     {c['text']} ({c['tokens']} tokens{', sha256 ' + c['sha256'] if c.get('sha256') else ''})")
    if result.get("options"):
        given = ", ".join(f"{k}={v}" for k, v in sorted(result["options"].items()) if v is not None)
        lines.append(f"options   {given}")
    features = result["requires"].get("cpu_features") or []
    lines.append(f"requires  {', '.join(features) or 'no particular CPU features'}"
                 + ("" if result["runs_here"] is None else "; runs here" if result["runs_here"] else "; NOT on this machine")
                 + (f" ({result['runs_here_note']})" if result["runs_here_note"] else ""))
    return "\n".join(lines) + "\n"
