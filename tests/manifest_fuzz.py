"""A bounded fuzzer of artifact manifests (issue 17): mutants of a small artifact whose manifest is
edited the way a script editing the JSON would (header digest recomputed, sections untouched),
each verified and loaded in a forked child that runs a step. A mutant may be refused with an
LlmcError or give the original's logits (within f32 rounding: a smaller step size chunks a
prompt differently); a signal, another exception, a hang or other
logits is a finding. ``verify`` must refuse whatever loading refuses (bar the machine check).

    python tests/manifest_fuzz.py ARTIFACT [--mutants N] [--seed S] [--json]

The test suite runs it (tests/test_hardening.py); the parent imports no native code, so each
child starts from a clean process image.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import pickle
import random
import select
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

PROMPT = [3, 17, 42, 99, 5, 250, 7, 8, 11, 64, 31, 2, 200, 90, 1, 77, 60, 23, 45, 120]
TIMEOUT_S = 30.0
# The parts of a manifest the runtime reads, mutated more often than the rest.
HOT = ("sections", "tensors", "target", "kv_pool", "entry_points", "vocab_size", "model", "eos_token_ids",
       "tokenizer", "requires", "format_version")


# -- mutants ---------------------------------------------------------------------------------

def _paths(value, path=()):
    """Every (path, value) in a JSON value, the root's children first."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, path + (index,))


def _strings(manifest) -> list[str]:
    return sorted({v for _, v in _paths(manifest) if isinstance(v, str) and len(v) < 80})


def _mutate_value(rng: random.Random, value, strings: list[str]):
    """A new value for ``value``: an edge case of its own type, or another type."""
    other_types = [None, "x", 1.5, -1, [], {}, True]
    if isinstance(value, bool):
        return rng.choice([not value, 0, 1, None])
    if isinstance(value, int):
        return rng.choice([0, -1, 1, value - 1, value + 1, value * 2, value // 2, -value, value + 64, value + 8,
                           value - 64, 2 ** 31, 2 ** 63, 2 ** 64, float(value)] + other_types)
    if isinstance(value, float):
        return rng.choice([0.0, -value, 1e300, int(value)] + other_types)
    if isinstance(value, str):
        return rng.choice(["", value + "x", value[:-1], rng.choice(strings)] + other_types)
    if isinstance(value, list):
        out = list(value)
        choice = rng.randrange(7)
        if choice == 0:
            return []
        if choice == 1 and out:
            del out[rng.randrange(len(out))]
        elif choice == 2 and out:
            out.insert(rng.randrange(len(out) + 1), copy.deepcopy(rng.choice(out)))
        elif choice == 3 and len(out) > 1:
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        elif choice == 4:
            rng.shuffle(out)
        elif choice == 5:
            out.append(rng.choice(other_types))
        else:
            return rng.choice(other_types)
        return out
    if isinstance(value, dict):
        out = dict(value)
        keys = list(out)
        choice = rng.randrange(6)
        if choice == 0:
            return {}
        if choice == 1 and keys:
            del out[rng.choice(keys)]
        elif choice == 2 and len(keys) > 1:
            a, b = rng.sample(keys, 2)
            out[a], out[b] = out[b], out[a]
        elif choice == 3:
            out[rng.choice(strings)] = rng.choice(other_types)
        elif choice == 4 and keys:
            key = rng.choice(keys)
            out[key + "x"] = out.pop(key)
        else:
            return rng.choice(other_types)
        return out
    return rng.choice(other_types)


def mutate(rng: random.Random, manifest: dict) -> tuple[dict, str]:
    """A mutant of ``manifest`` (one or two edits) and a line saying what changed."""
    out = copy.deepcopy(manifest)
    strings = _strings(manifest)
    said = []
    for _ in range(rng.choice([1, 1, 1, 2])):
        paths = [p for p, _ in _paths(out) if p]
        hot = [p for p in paths if p[0] in HOT]
        path = rng.choice(hot if hot and rng.random() < 0.85 else paths)
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
        new = _mutate_value(rng, old, strings)
        parent[path[-1]] = new
        said.append(f"{'.'.join(map(str, path))}: {_short(old)} -> {_short(new)}")
    return out, "; ".join(said)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) < 60 else text[:57] + "..."


def write_mutant(original: bytes, manifest: dict, path: Path) -> bool:
    """``original`` with ``manifest`` in place of its own and the header digest recomputed; False
    when the new manifest does not fit before the first section."""
    from llmc.artifact import HEADER_SIZE

    header = struct.Struct("<8sIIQ32s")
    magic, version, header_size, size, _ = header.unpack_from(original, 0)
    sections = json.loads(original[header_size: header_size + size])["sections"]
    room = min(entry["offset"] for entry in sections.values()) - HEADER_SIZE
    encoded = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    if len(encoded) > room:
        return False
    encoded = encoded.ljust(max(size, len(encoded)), b" ")
    head = header.pack(magic, version, header_size, len(encoded), hashlib.sha256(encoded).digest())
    body = bytearray(original)
    body[:HEADER_SIZE] = head.ljust(HEADER_SIZE, b"\0")
    body[HEADER_SIZE: HEADER_SIZE + len(encoded)] = encoded
    path.write_bytes(bytes(body))
    return True


# -- one child per mutant --------------------------------------------------------------------

def _attempt(fn):
    from llmc.errors import LlmcError

    try:
        return "ok", fn()
    except LlmcError as exc:
        return "refused", str(exc).split("\n")[0][:200]
    except Exception as exc:                      # noqa: BLE001 -- what the fuzzer looks for
        return "error", f"{type(exc).__name__}: {exc}"[:200]


def _child(path: Path, with_verify: bool):
    """Runs in the fork: verify (and, if it passes, inspect and verify's report), then load and run
    (logits of PROMPT, then a short generation)."""
    import numpy as np

    import llmc
    from llmc.verify import verify_artifact

    verified = _attempt(lambda: verify_artifact(path)["ok"]) if with_verify else ("ok", True)
    if with_verify and verified[0] == "ok":     # inspect reads what verify passed: it must not fail
        import contextlib
        import io

        from llmc.cli import inspect_artifact
        from llmc.verify import format_result

        with contextlib.redirect_stdout(io.StringIO()):
            shown = _attempt(lambda: inspect_artifact(str(path)))
            if shown[0] == "ok":
                shown = _attempt(lambda: format_result(verify_artifact(path)))
        if shown[0] == "error":
            verified = ("error", f"verify passed, inspect or verify's report failed: {shown[1]}")

    def run():
        model = llmc.load(path, max_context=64, threads=1)
        logits = model.logits(PROMPT)
        model.generate(PROMPT[:5], max_new_tokens=3)
        return np.asarray(logits, np.float32)

    return verified, _attempt(run)


def run_child(path: Path, with_verify: bool = True, timeout: float = TIMEOUT_S) -> dict:
    """Fork, run ``_child``; the outcome with how the child ended."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: report through the pipe, never return
        os.close(read)
        try:
            data = pickle.dumps(_child(path, with_verify))
        except BaseException as exc:               # noqa: BLE001
            data = pickle.dumps((("error", repr(exc)), ("error", repr(exc))))
        with os.fdopen(write, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(write)
    chunks, deadline = [], time.monotonic() + timeout
    with os.fdopen(read, "rb") as pipe:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([pipe], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"end": "hang"}
            chunk = os.read(pipe.fileno(), 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"end": f"signal {signal.Signals(os.WTERMSIG(status)).name}"}
    try:
        verified, loaded = pickle.loads(b"".join(chunks))
    except Exception:                              # noqa: BLE001
        return {"end": f"exit {os.WEXITSTATUS(status)} without a result"}
    return {"end": "exit", "verify": verified, "load": loaded}


def judge(outcome: dict, baseline, path: Path) -> str | None:
    """None for an allowed outcome, else what is wrong. A refusal that does not name the file (a
    context of 64 beyond an edited max_seq) is about the request, which verify cannot know."""
    import numpy as np

    if outcome["end"] != "exit":
        return outcome["end"]
    (v_kind, v_what), (l_kind, l_what) = outcome["verify"], outcome["load"]
    if "error" in (v_kind, l_kind):
        return f"not an LlmcError: {v_what if v_kind == 'error' else l_what}"
    if l_kind == "ok" and not (l_what.shape == baseline.shape and np.allclose(l_what, baseline, rtol=1e-4, atol=1e-5)):
        return "other logits, no error"
    if l_kind == "refused" and v_kind == "ok" and str(path) in l_what and "CPU features" not in l_what:
        return f"verify said ok, loading refused the file: {l_what}"
    return None


def fuzz(artifact: Path, mutants: int, seed: int, report=None) -> dict:
    original = artifact.read_bytes()
    from llmc.artifact import read_artifact

    manifest = read_artifact(artifact, machine=False).manifest
    with tempfile.TemporaryDirectory(prefix="llmc-fuzz-") as folder:
        path = Path(folder) / "mutant.llmc"
        base = run_child(artifact, with_verify=False)
        if base.get("load", ("",))[0] != "ok":
            raise SystemExit(f"the original artifact does not run: {base}")
        baseline = base["load"][1]
        rng = random.Random(seed)
        counts = {"refused": 0, "same": 0, "skipped": 0}
        findings = []
        for index in range(mutants):
            mutant, what = mutate(rng, manifest)
            if not write_mutant(original, mutant, path):
                counts["skipped"] += 1
                continue
            outcome = run_child(path)
            wrong = judge(outcome, baseline, path)
            if wrong:
                findings.append({"mutant": index, "edit": what, "finding": wrong})
            else:
                counts["same" if outcome["load"][0] == "ok" else "refused"] += 1
            if report:
                report(index, what, wrong or outcome["load"][0])
    return {"mutants": mutants, **counts, "findings": findings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--mutants", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--verbose", action="store_true", help="a line per mutant")
    args = parser.parse_args()
    report = (lambda i, what, result: print(f"{i:4d} {result[:70]:70s} {what}", flush=True)) if args.verbose else None
    result = fuzz(args.artifact, args.mutants, args.seed, report)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['mutants']} mutants: {result['refused']} refused, {result['same']} ran as before, "
              f"{result['skipped']} skipped, {len(result['findings'])} findings")
        for finding in result["findings"]:
            print(f"  #{finding['mutant']}: {finding['finding']}  ({finding['edit']})")
    sys.exit(1 if result["findings"] else 0)


if __name__ == "__main__":
    main()
