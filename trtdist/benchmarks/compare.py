"""`trtdist bench --compare A.json B.json`: two result files side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: keys that describe a run rather than measure it; shown first, never as a ratio
_INFO = ("benchmark", "model", "device", "url", "tp_size", "pp_size", "sweep")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists of dicts -> {'ttft_ms.p50': 1.2, 'points[0].duration_s': ...};
    lists of scalars are left out (per-request samples), strings and numbers kept."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        if all(isinstance(v, dict) for v in obj):
            for i, v in enumerate(obj):
                out |= flatten(v, f"{prefix}[{i}]")
    elif obj is None or isinstance(obj, (int, float, str, bool)):
        out[prefix] = obj
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def compare_table(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B"),
                  ) -> str:
    """A table with one row per metric present in either result: A, B and B / A."""
    fa, fb = flatten(a), flatten(b)
    keys = list(fa) + [k for k in fb if k not in fa]
    rows = [("metric", names[0], names[1], "B/A")]
    for k in keys:
        va, vb = fa.get(k), fb.get(k)
        ratio = ""
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        if numeric and va and k.split(".")[-1] not in _INFO:
            ratio = f"{vb / va:.3f}"  # type: ignore[operator]
        rows.append((k, _fmt(va), _fmt(vb), ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def compare_files(path_a: str | Path, path_b: str | Path) -> str:
    results = []
    for p in (path_a, path_b):
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"--compare {p}: no such file")
        try:
            results.append(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"--compare {p}: not a JSON result file ({e})") from None
    return compare_table(results[0], results[1], (Path(path_a).name, Path(path_b).name))
