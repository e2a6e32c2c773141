"""Reading a run's own JSON files back (``metrics.jsonl``, ``summary.json``, ``eval/*/metrics.json``)
tolerantly: a run killed mid-write, a disk that filled, or a hand edit leaves lines that are cut
off, of another shape, or nested past any parser. Each reader keeps what has the shape the run
writes and drops the rest, so that a report or a resume never fails on a damaged line."""

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


def json_object(text: str) -> Optional[Dict[str, Any]]:
    """``text`` as a JSON object; None for anything else (not JSON, a list, nested too deep)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _step(row: Dict[str, Any]) -> Optional[int]:
    step = row.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def row_step(line: str) -> Optional[int]:
    """The step of one ``metrics.jsonl`` line; None for a line without one."""
    row = json_object(line)
    return None if row is None else _step(row)


def _numbers(mapping: Dict[str, Any]) -> Dict[str, float]:
    return {key: float(value) for key, value in mapping.items() if isinstance(key, str) and _number(value)}


def evaluation_row(row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``{"step", "eval": {metric: number, "per_category_AP": {name: number}}}`` from a row
    with that shape; None otherwise. AP is required: it is what a report and ``best.pt`` read."""
    step, metrics = _step(row), row.get("eval")
    if step is None or not isinstance(metrics, dict) or not _number(metrics.get("AP")):
        return None
    per_category = metrics.get("per_category_AP")
    clean = {**_numbers(metrics), "per_category_AP": _numbers(per_category) if isinstance(per_category, dict) else {}}
    return {"step": step, "eval": clean}


@dataclass
class MetricsRows:
    """``metrics.jsonl`` as the run wrote it: training rows (step and numbers; a value that is
    not a number is left out) and evaluation rows, each in file order; ``dropped`` counts the
    lines without either shape."""

    train: List[Dict[str, Any]] = field(default_factory=list)
    evaluations: List[Dict[str, Any]] = field(default_factory=list)
    dropped: int = 0


def metrics_rows(text: str) -> MetricsRows:
    rows = MetricsRows()
    for line in text.splitlines():
        row = json_object(line)
        step = None if row is None else _step(row)
        if step is None:
            rows.dropped += bool(line.strip())
        elif "eval" in row:
            evaluation = evaluation_row(row)
            if evaluation is None:
                rows.dropped += 1
            else:
                rows.evaluations.append(evaluation)
        else:
            rows.train.append({**_numbers(row), "step": step})
    return rows
