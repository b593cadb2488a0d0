"""What every pass did, as readable tables (tabulate) and as JSON-able data."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .pass_manager import PassRecord

MAX_ROWS_SHOWN = 30


def _human(n: int | float | None, unit: str = "") -> str:
    if n is None:
        return "n/a"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _ratio(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return "n/a"
    return f"{after / before:.3f}x"


@dataclass
class Report:
    model: str
    frontend: str
    before: dict[str, Any]
    after: dict[str, Any]
    records: list[PassRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def pass_record(self, name: str) -> PassRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(f"no pass named {name!r} ran; ran: {[r.name for r in self.records]}")

    def summary_table(self) -> str:
        rows = [
            ["parameters", _human(self.before["parameters"]), _human(self.after["parameters"]),
             _ratio(self.before["parameters"], self.after["parameters"])],
            ["MACs", _human(self.before["macs"]), _human(self.after["macs"]),
             _ratio(self.before["macs"], self.after["macs"])],
            ["size", _human(self.before["bytes"], "B"), _human(self.after["bytes"], "B"),
             _ratio(self.before["bytes"], self.after["bytes"])],
        ]
        return tabulate(rows, headers=["", "before", "after", "ratio"], tablefmt="simple")

    def timing_table(self) -> str:
        rows = [
            [r.name + (" (inserted)" if r.inserted else ""), f"{r.seconds:.3f}", r.summary, _verification_cell(r)]
            for r in self.records
        ]
        rows.append(["total", f"{self.total_seconds:.3f}", "", ""])
        return tabulate(rows, headers=["pass", "seconds", "what it did", "verified"], tablefmt="simple")

    def __str__(self) -> str:
        parts = [f"fxsparse report: {self.model} (frontend: {self.frontend})"]
        parts += [f"note: {n}" for n in self.notes]
        for record in self.records:
            if not record.rows:
                continue
            shown = record.rows[:MAX_ROWS_SHOWN]
            parts.append(f"\n== {record.name}: {record.summary}")
            parts.append(tabulate(shown, headers="keys", tablefmt="simple"))
            if len(record.rows) > MAX_ROWS_SHOWN:
                parts.append(f"... {len(record.rows) - MAX_ROWS_SHOWN} more rows (report.to_dict() has them all)")
        parts.append("\n== passes")
        parts.append(self.timing_table())
        parts.append("\n== summary")
        parts.append(self.summary_table())
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "frontend": self.frontend,
            "notes": list(self.notes),
            "before": dict(self.before),
            "after": dict(self.after),
            "passes": [
                {
                    "name": r.name,
                    "inserted": r.inserted,
                    "seconds": r.seconds,
                    "summary": r.summary,
                    "rows": r.rows,
                    "verification": r.verification,
                }
                for r in self.records
            ],
            "total_seconds": self.total_seconds,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    def plot_sparsity(self, path: str | Path) -> Path:
        """A PNG of the sparsity of every layer the passes report on (matplotlib: ``fxsparse[plot]``)."""
        from .plots import plot_sparsity

        return plot_sparsity(self, path, title=f"{self.model}: sparsity per layer")

    def plot_latency(self, path: str | Path) -> Path:
        """A PNG of each timed layer's dense and best sparse latency against its sparsity (SparseKernels)."""
        from .plots import plot_latency

        return plot_latency(self, path, title=f"{self.model}: layer latency against sparsity")


def _verification_cell(record: PassRecord) -> str:
    v = record.verification
    if not v:
        return ""
    return f"max abs {v['max_abs']:.1e}, rel {v['max_rel']:.1e}"
