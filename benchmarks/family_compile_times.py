"""Compile time per decoder family (issue 16): import (trace), the passes, lower (generate C and
build it with gcc), for the tiny random configs of tests/test_families.py, cpu f32, build cache
off so every phase runs. One line per family as a Markdown table row.

    python benchmarks/family_compile_times.py [FAMILY ...]     (default: every checked family)
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_families import CHECKED, tiny  # noqa: E402

from llmc.compiler import compile_model  # noqa: E402


def main() -> None:
    print("| family | import s | passes s | lower s | total s |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for name in sys.argv[1:] or CHECKED:
            report = compile_model(tiny(name), Path(folder) / f"{name}.llmc", target="cpu", quant="f32", kv="f32",
                                   progress=None, cache="off")
            t = report.phases
            passes = sum(v for k, v in t.items() if k not in ("import", "lower"))
            print(f"| {name} | {t['import']:.2f} | {passes:.2f} | {t['lower']:.2f} | {report.seconds:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
