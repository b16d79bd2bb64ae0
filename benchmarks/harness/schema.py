"""What a well-formed result file is: strict JSON (no NaN or Infinity) with the keys its tables read.

:func:`problems` returns a list of human-readable problems (empty when the payload is well formed); the
harness fails a run that wrote a malformed file, and the smoke test checks every file a quick run wrote.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ROW_KEYS = ("what", "size", "ours", "baseline", "ratio", "target", "unit", "baseline_name", "note", "passed")
ACCURACY_ROW_KEYS = ("sampler", "lr", "bayesflow", "bayesflow_se", "bayesflow_exact", "posteriors", "posteriors_se")
CURVLINOPS_KEYS = ("adam_step_s", "kfac_ours_s", "kfac_curvlinops_s", "kfac_max_rel_difference", "ggnvp_ours_s",
                   "ggnvp_curvlinops_s")
MIXING_KEYS = ("benchmark", "quick", "machine", "protocol", "targets")


def _reject(constant: str):
    raise ValueError(f"non-standard JSON constant {constant}")


def load(path: Path, strict: bool = True) -> Any:
    """Parse ``path`` as JSON; ``strict``: ``NaN``/``Infinity`` are errors."""
    text = Path(path).read_text()
    return json.loads(text, parse_constant=_reject) if strict else json.loads(text)


def _number(value: Any, positive: bool = False) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok and (value > 0 or not positive)


def _rows(payload: dict) -> list[str]:
    out = [f"missing key {k!r}" for k in ("benchmark", "machine", "rows") if k not in payload]
    rows = payload.get("rows")
    if not isinstance(rows, list) or not rows:
        return [*out, "'rows' is not a non-empty list"]
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            out.append(f"row {i} misses {missing}")
            continue
        if not isinstance(row["what"], str) or not _number(row["ours"], positive=True):
            out.append(f"row {i} ({row['what']!r}): 'ours' must be a positive number, got {row['ours']!r}")
        if row["unit"] not in ("s", "x"):
            out.append(f"row {i}: unit must be 's' or 'x', got {row['unit']!r}")
        for key in ("baseline", "ratio", "target"):
            if row[key] is not None and not _number(row[key]):
                out.append(f"row {i}: {key!r} must be a number or null, got {row[key]!r}")
        if row["passed"] not in (True, False, None):
            out.append(f"row {i}: 'passed' must be true, false or null, got {row['passed']!r}")
    return out


def _accuracy(payload: dict) -> list[str]:
    rows = payload.get("rows")
    if not isinstance(rows, list) or not rows:
        return ["'rows' is not a non-empty list"]
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ACCURACY_ROW_KEYS if k not in row]
        if missing:
            out.append(f"row {i} misses {missing}")
        elif not _number(row["bayesflow"], positive=True):
            out.append(f"row {i}: 'bayesflow' must be a positive number, got {row['bayesflow']!r}")
    for i, curve in enumerate(payload.get("curves", [])):
        if not all(k in curve for k in ("label", "gradients", "value")):
            out.append(f"curve {i} misses one of 'label', 'gradients', 'value'")
        elif len(curve["gradients"]) != len(curve["value"]) or not curve["value"]:
            out.append(f"curve {i} ({curve['label']}): gradients and values differ in length or are empty")
    return out


def _curvlinops(payload: dict) -> list[str]:
    return [f"{k!r} must be a number, got {payload.get(k)!r}" for k in CURVLINOPS_KEYS if not _number(payload.get(k))]


def _mixing(payload: dict) -> list[str]:
    out = [f"missing key {k!r}" for k in MIXING_KEYS if k not in payload]
    targets = payload.get("targets")
    if not isinstance(targets, dict) or not targets:
        return [*out, "'targets' is not a non-empty object"]
    for name, target in targets.items():
        for key in ("title", "goal", "floor", "configurations"):
            if key not in target:
                out.append(f"target {name!r} misses {key!r}")
    return out


def _gpu(payload: dict) -> list[str]:
    out = [f"missing key {k!r}" for k in ("device", "torch") if k not in payload]
    for name, value in payload.items():
        if isinstance(value, dict) and "ok" in value and value["ok"] not in (True, False):
            out.append(f"check {name!r}: 'ok' must be true or false")
    return out


CHECKS = {"rows": _rows, "accuracy": _accuracy, "curvlinops": _curvlinops, "mixing": _mixing, "gpu": _gpu}


def problems(kind: str, payload: Any) -> list[str]:
    """What is wrong with ``payload`` as a result of a benchmark of ``kind`` (see :mod:`harness.suite`)."""
    if kind not in CHECKS:
        raise ValueError(f"kind must be one of {sorted(CHECKS)}, got {kind!r}")
    if not isinstance(payload, dict):
        return [f"the file holds a {type(payload).__name__}, not a JSON object"]
    return CHECKS[kind](payload)


def check_file(kind: str, path: Path) -> list[str]:
    """:func:`problems` of the file at ``path``, with a parse error as the one problem."""
    try:
        payload = load(path)
    except (OSError, ValueError) as error:
        return [f"{type(error).__name__}: {error}"]
    return problems(kind, payload)
