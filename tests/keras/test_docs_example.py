"""docs/examples/choosing_keras.py runs on this backend, and prints a line per method that shows what it promises."""

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "choosing_keras.py"
METHODS = (
    "pretrained",
    "adamw",
    "adam_ftp",
    "sgd_ftp",
    "adam_spd",
    "ftp(adamw)",
    "spd(adam)",
    "l2sp(adam)",
    "marssp(adam)",
    "adamw + tpgm",
    "wise_ft (α=0.5)",
)
LINE = re.compile(r"^(.+?)\s+train loss (\S+)\s+‖θ − θ₀‖ of the backbone (\S+)$")


def test_the_keras_example_runs_every_method():
    # a fresh process on this backend: the tests' float64 setting must not leak into the example
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        match = LINE.match(line)
        if match:
            rows[match[1]] = (float(match[2]), float(match[3]))
    assert tuple(rows) == METHODS, result.stdout
    start = rows.pop("pretrained")
    assert start[1] == 0.0
    for name, (loss, drift) in rows.items():
        assert 0 < loss < start[0] and drift > 0, name  # every method trains and moves the backbone
    # the anchored methods keep the backbone nearer its pre-trained weights than AdamW does
    for name in ("adam_ftp", "sgd_ftp", "ftp(adamw)", "l2sp(adam)", "marssp(adam)", "adamw + tpgm"):
        assert rows[name][1] < rows["adamw"][1], name
    # (printed to 3 decimals) WiSE-FT at α = 0.5 is halfway from the pre-trained backbone
    assert rows["wise_ft (α=0.5)"][1] == pytest.approx(rows["adamw"][1] / 2, abs=2e-3)
