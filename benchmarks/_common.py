"""Helpers shared by the benchmarks: percentiles, tables, JSON results."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiollmcache._table import format_table

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarize(samples_ns: Sequence[int]) -> dict[str, float]:
    values = sorted(s / 1000 for s in samples_ns)
    return {
        "n": len(values),
        "p50_us": percentile(values, 50),
        "p90_us": percentile(values, 90),
        "p99_us": percentile(values, 99),
        "mean_us": sum(values) / len(values),
    }


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print(format_table(header, rows))


def write_json(name: str, payload: dict[str, Any], path: str | None = None) -> Path:
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        **payload,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out
