"""Figures a person would rather see than a table: sparsity per layer, latency against sparsity (PNG, matplotlib).

matplotlib is an optional extra (``pip install "fxsparse[plot]"``), imported only when a figure is drawn. Figures
are drawn on their own ``Figure`` objects (no pyplot state), so plotting never changes the user's backend.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import BadArgumentError, MissingDependencyError


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError('plotting needs matplotlib: pip install "fxsparse[plot]"') from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def layer_sparsity(source: Any) -> list[tuple[str, float]]:
    """(layer, fraction of zero weights) pairs from a report (rows of any pass with "layer" and "sparsity"
    columns, e.g. SparseKernels'), a list of such rows, or a module (every weight of two or more dimensions)."""
    if isinstance(source, torch.nn.Module):
        return [(name.removesuffix(".weight"), 1.0 - (p.detach() != 0).float().mean().item())
                for name, p in source.named_parameters() if p.dim() >= 2]
    rows = _rows(source)
    pairs = [(str(r["layer"]), float(r["sparsity"])) for r in rows if "layer" in r and r.get("sparsity") is not None]
    if not pairs:
        raise BadArgumentError("nothing to plot: no rows with a layer and its sparsity (run SparseKernels, or pass "
                               "the module itself)")
    return pairs


def plot_sparsity(source: Any, path: str | Path, title: str = "sparsity per layer") -> Path:
    """A bar per layer: its fraction of zero weights. ``source`` as :func:`layer_sparsity` takes it."""
    pairs = layer_sparsity(source)
    figure = _figure(7, max(2.5, 0.22 * len(pairs) + 1))
    axes = figure.add_subplot()
    names = [name for name, _ in pairs]
    axes.barh(range(len(pairs)), [100 * s for _, s in pairs], color="tab:blue")
    axes.set_yticks(range(len(pairs)), names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("zero weights (%)")
    axes.set_title(title)
    return _save(figure, path)


def latency_points(source: Any) -> list[dict[str, Any]]:
    """Points ``{"series", "sparsity", "ms"}``: taken as they are from a list of such dicts (a benchmark's
    results), or from a report's SparseKernels rows (per timed layer, "dense" and "best sparse format")."""
    rows = _rows(source)
    if rows and all({"series", "sparsity", "ms"} <= set(r) for r in rows):
        return rows
    points = []
    for row in rows:
        if row.get("dense ms") is None or row.get("best ms") is None:
            continue
        points.append({"series": "dense", "sparsity": row["sparsity"], "ms": row["dense ms"]})
        points.append({"series": "best sparse format", "sparsity": row["sparsity"], "ms": row["best ms"]})
    if not points:
        raise BadArgumentError("nothing to plot: no timed layers (SparseKernels rows with 'dense ms' and 'best ms') "
                               "and no points {series, sparsity, ms}")
    return points


def plot_latency(source: Any, path: str | Path, title: str = "latency against sparsity") -> Path:
    """Latency (ms, log scale) against sparsity, one line per series. ``source`` as :func:`latency_points`."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for point in latency_points(source):
        series[str(point["series"])].append((100 * float(point["sparsity"]), float(point["ms"])))
    figure = _figure(7, 4.5)
    axes = figure.add_subplot()
    for name, values in series.items():
        values.sort()
        axes.plot([s for s, _ in values], [ms for _, ms in values], marker="o", label=name)
    axes.set_yscale("log")
    axes.set_xlabel("sparsity (% zero weights)")
    axes.set_ylabel("latency (ms)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    return _save(figure, path)


def _rows(source: Any) -> list[dict[str, Any]]:
    records = getattr(source, "records", None)
    if records is not None:  # a Report
        return [row for record in records for row in record.rows]
    if isinstance(source, Iterable) and not isinstance(source, (str, bytes, dict)):
        return [row for row in source if isinstance(row, dict)]
    raise BadArgumentError(f"cannot plot a {type(source).__name__}: give a report, a list of rows or a module")


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
