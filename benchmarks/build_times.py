"""Build times of a build file: cold (empty cache), then warm rebuilds (medians of several runs).

    python benchmarks/build_times.py [examples/ci/llmc.toml] [--runs 5]

Each run is the `llmc` command itself, timed from outside (wall clock, Python start-up
included), in a temporary folder with its own cache, so nothing from earlier builds is reused.
Prints one row per case with the cache hits the build reported, and checks the warm artifacts are
byte-identical to the cold ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_build(folder: Path, env: dict, *args: str) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llmc", "build", "llmc.toml", "--json", *args], cwd=folder,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"llmc build failed: {done.stderr.strip().splitlines()[-1]}")
    return seconds, json.loads(done.stdout)


def hits(result: dict) -> str:
    counts = [result["model"]["cache"]] + [a["cache"] for a in result["artifacts"]]
    found = sum(c["hits"] for part in counts for c in part.values())
    total = found + sum(c["misses"] for part in counts for c in part.values())
    return f"{found}/{total}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_file", nargs="?", default=str(Path(__file__).parent.parent / "examples/ci/llmc.toml"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmc-build-times-") as tmp:
        folder = Path(tmp)
        shutil.copy(args.build_file, folder / "llmc.toml")
        env = dict(os.environ, LLMC_CACHE_DIR=str(folder / "cache"))
        rows = []
        seconds, cold = timed_build(folder, env)
        rows.append(("all artifacts, cold cache", seconds, hits(cold)))
        reference = {a["name"]: a["sha256"] for a in cold["artifacts"]}
        for label, extra in [("all artifacts, warm", ()), *[(f"{a} only, warm", ("--only", a)) for a in reference]]:
            runs = [timed_build(folder, env, *extra) for _ in range(args.runs)]
            for _, result in runs:
                for artifact in result["artifacts"]:
                    assert artifact["sha256"] == reference[artifact["name"]], f"{artifact['name']} changed"
            rows.append((label, statistics.median(s for s, _ in runs), hits(runs[0][1])))
    print(f"{'case':<32} {'wall s':>7}  cache hits")
    for label, seconds, found in rows:
        print(f"{label:<32} {seconds:7.1f}  {found}")
    print(f"(warm rows: medians of {args.runs} runs; every warm artifact byte-identical to the cold build)")


if __name__ == "__main__":
    main()
