"""The examples run as a user would run them, and do what they promise."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHANCE = 0.1  # ten digits
ACCURACY_ROW = re.compile(r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)K -> ([\d.]+)K\s+([\d.]+)K -> ([\d.]+)K$",
                          re.MULTILINE)


def run_example(name: str, *args: str, timeout: float = 120) -> str:
    completed = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                               timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_prune_digits_fine_tunes_both_criteria_back_well_above_chance():
    pytest.importorskip("sklearn")
    output = run_example("prune_digits.py", "--epochs", "3", "--finetune-epochs", "2")
    rows = {m.group(1): [float(v) for v in m.groups()[1:]] for m in ACCURACY_ROW.finditer(output)}
    assert set(rows) == {"l2", "taylor"}, output
    for criterion, (before, _pruned, fine_tuned, params_before, params_after, macs_before, macs_after) in rows.items():
        assert before > 0.9, (criterion, output)
        assert fine_tuned > 7 * CHANCE, (criterion, output)
        assert params_after < 0.5 * params_before and macs_after < 0.5 * macs_before, (criterion, output)
