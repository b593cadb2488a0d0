"""Saving a compiled module so it loads without the original model's code (torch.export), with its plan inside."""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import FxsparseError

log = logging.getLogger("fxsparse")

PLAN_FILE = "fxsparse_plan.json"
REPORT_FILE = "fxsparse_report.json"


def save_module(module: torch.nn.Module, path: str | Path, args: tuple, kwargs: dict, extra: dict[str, str]) -> str:
    """Write ``module`` to ``path``; returns the format used: "export" (a .pt2 program) or "pickle" (needs code).

    torch.export is preferred: the file holds the graph and weights and loads with no model code. A module that
    torch.export cannot take is pickled whole instead, and then its classes must be importable when loading: a
    warning says so, with torch.export's reason (also kept in the file as ``export_error``).
    """
    path = Path(path)
    try:
        program = torch.export.export(module, args, kwargs=kwargs, strict=False)
    except Exception as error:  # noqa: BLE001 - fall back to pickling, and say so
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        log.warning("fxsparse: %s is pickled, not a torch.export program (torch.export failed: %s); loading it "
                    "needs the model's code", path, reason)
        torch.save({"module": module, "extra": extra, "export_error": str(error)[:500]}, path)
        return "pickle"
    torch.export.save(program, path, extra_files=extra)
    return "export"


def load_module(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load what :func:`save_module` wrote; returns the module and its extra files (plan, report) parsed."""
    path = Path(path)
    if not path.exists():
        raise FxsparseError(f"no saved model at {path}")
    extra = {PLAN_FILE: "", REPORT_FILE: ""}
    if _is_exported_program(path):
        try:
            program = torch.export.load(path, extra_files=extra)
        except Exception as error:  # noqa: BLE001
            raise FxsparseError(f"{path}: cannot load the saved program ({type(error).__name__}: {error})") from error
        module = program.module()
    else:  # the pickle fallback
        try:
            payload = torch.load(path, weights_only=False)
        except Exception:  # noqa: BLE001 - not a torch file at all
            payload = None
        if not isinstance(payload, dict) or "module" not in payload:
            raise FxsparseError(f"{path} is not a model saved by fxsparse") from None
        module, extra = payload["module"], payload["extra"]
    parsed = {name: json.loads(text) for name, text in extra.items() if text}
    return module, parsed


def _is_exported_program(path: Path) -> bool:
    """torch.export's .pt2 archives hold an ``archive_format`` record; torch.save's zip files do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "archive_format" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
