"""``LLMC_PROFILE=1``: where a step's time goes, per op kind.

A target whose generated code carries profile marks (the cpu target: one per op, after the
barrier that ends it) reports seconds per site; the executor adds the time its ``run`` calls
took, so what the host spends around the library (Python, ctypes, the batch's arrays) shows too.
With the variable set, each executor prints its table to stderr when the process exits;
``llmc bench --profile`` prints one per phase.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def profile_requested() -> bool:
    return os.environ.get("LLMC_PROFILE", "").strip() not in ("", "0")


@dataclass
class Profile:
    steps: int
    sites: list[tuple[str, float]]      # (label "kind|detail", seconds), in the library's order
    wall: float                         # seconds inside the executor's run calls
    threads: int

    def by_kind(self) -> dict[str, dict[str, list]]:
        """kind -> detail -> [seconds, sites]"""
        kinds: dict[str, dict[str, list]] = {}
        for label, seconds in self.sites:
            kind, _, detail = label.partition("|")
            entry = kinds.setdefault(kind, {}).setdefault(detail, [0.0, 0])
            entry[0] += seconds
            entry[1] += 1
        return kinds


    def summary(self) -> dict:
        """ms a step by kind (JSON-friendly)."""
        steps = max(self.steps, 1)
        kinds = {kind: round(1e3 * sum(s for s, _ in details.values()) / steps, 4)
                 for kind, details in self.by_kind().items()}
        return {"steps": self.steps, "ms_per_step": round(1e3 * self.wall / steps, 4), "kinds": kinds}


def format_profile(profile: Profile, title: str = "llmc profile") -> str:
    steps = max(profile.steps, 1)
    inside = sum(s for _, s in profile.sites)
    total = max(profile.wall, inside, 1e-12)
    lines = [f"{title}: {profile.steps} steps, {1e3 * total / steps:.3f} ms a step, {profile.threads} threads "
             "(ms a step; share of the time in steps)"]

    def row(name: str, seconds: float, count: int | str = "") -> str:
        return f"  {name:<44} {1e3 * seconds / steps:9.3f} {100 * seconds / total:6.1f}%  {count}"

    kinds = profile.by_kind()
    order = sorted(kinds, key=lambda k: -sum(s for s, _ in kinds[k].values()))
    for kind in order:
        details = kinds[kind]
        sites = sum(n for _, n in details.values())
        lines.append(row(kind, sum(s for s, _ in details.values()), f"{sites} ops"))
        if len(details) > 1:
            for detail, (seconds, n) in sorted(details.items(), key=lambda item: -item[1][0]):
                lines.append(row("  " + detail, seconds, f"{n} ops"))
    if profile.wall > inside:
        lines.append(row("host: the executor's arrays and ctypes call", profile.wall - inside))
    return "\n".join(lines)
