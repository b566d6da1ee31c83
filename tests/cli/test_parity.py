"""`tether parity`: the table, the verdicts, the exit status, skipped backends, --json, --device gpu."""

import json
import subprocess
import sys

import pytest

from tether import parity
from tether.__main__ import main


def record(
    backend="torch", optimizer="adam_spd", problem="mlp", dtype="float64", deviation=1e-14, verdict="pass"
):
    return {
        "backend": backend,
        "device": "cpu",
        "optimizer": optimizer,
        "problem": problem,
        "scope": "same model" if problem == "same-model" else "arrays",
        "dtype": dtype,
        "tolerance": 1e-10,
        "deviation": deviation,
        "verdict": verdict,
    }


def test_a_row_takes_the_worst_problem_and_the_worst_verdict():
    table = parity.summarize(
        [
            record(problem="closed-loop", deviation=1e-15),
            record(problem="mlp", deviation=3e-14),
            record(optimizer="adam_ftp", deviation=None, verdict="ERROR"),
            record(optimizer="adam_ftp", problem="closed-loop", deviation=2.0, verdict="FAIL"),
            record(optimizer="ftp(adamw) wrapper", deviation=None, verdict="n/a"),
            record(problem="same-model", deviation=2e-2, verdict="FAIL"),
        ]
    )
    same_model = [row for row in table if row[3] == "same model"]
    assert len(same_model) == 1 and same_model[0][-1] == "FAIL"  # a row of its own
    rows = {row[2]: row for row in table if row[3] == "arrays"}
    assert rows["adam_spd"][5] == 3e-14 and rows["adam_spd"][-1] == "pass"
    assert rows["adam_ftp"][-1] == "ERROR" and rows["adam_ftp"][5] == 2.0
    assert rows["ftp(adamw) wrapper"][-1] == "n/a"
    text = parity.format_table(table)
    assert text.splitlines()[0].split() == [
        "backend",
        "device",
        "optimizer",
        "problem",
        "dtype",
        "max",
        "|Δ|",
        "tolerance",
        "verdict",
    ]
    assert "3.00e-14" in text and "1e-10" in text


def test_a_failure_makes_the_exit_status_1(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(parity, "installed", lambda backend: backend == "torch")
    monkeypatch.setattr(
        parity,
        "run_backend",
        lambda *a: [record(), record(optimizer="adam_ftp", deviation=1.0, verdict="FAIL")],
    )
    out = tmp_path / "parity.json"
    assert main(["parity", "--json", str(out)]) == 1
    printed = capsys.readouterr()
    assert "1 passed, 1 failed" in printed.out
    assert "keras/jax: skipped, not installed" in printed.err
    result = json.loads(out.read_text())
    assert result["backends"]["torch"] == "failed"
    assert result["backends"]["jax"] == "skipped (not installed)"
    assert {r["verdict"] for r in result["rows"]} == {"pass", "FAIL"}


def test_no_backend_installed_is_not_a_failure(monkeypatch, capsys):
    monkeypatch.setattr(parity, "installed", lambda backend: False)
    assert main(["parity"]) == 0
    assert "0 passed, 0 failed" in capsys.readouterr().out


def test_an_unknown_backend_is_a_usage_error(capsys):
    assert main(["parity", "--backends", "mxnet"]) == 2
    assert "unknown backend" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_real_run_passes(backend, tmp_path):
    pytest.importorskip(backend)
    out = tmp_path / "parity.json"
    cmd = [
        sys.executable,
        "-m",
        "tether",
        "parity",
        "--backends",
        backend,
        "--steps",
        "4",
        "--json",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 72  # 18 cases × 2 dtypes × 2 problem scopes on the CPU
    assert {r["problem"] for r in rows} == {"arrays", "same model"}
    # Keras's Adam (ε before the bias correction) has no PyTorch or optax form
    keras_only = {r["optimizer"] for r in rows if r["verdict"] == "n/a"}
    assert keras_only == {"ftp(adamw, eps hat) wrapper", "spd(adam, eps hat) wrapper"}
    assert all(r["verdict"] == "pass" for r in rows if r["optimizer"] not in keras_only)
    float64 = [r["max_abs_deviation"] for r in rows if r["dtype"] == "float64" and r["verdict"] == "pass"]
    assert max(float64) < 1e-12


def test_gpu_parity_without_a_gpu_says_so_and_passes():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the nox session parity-gpu runs for real")
    cmd = [sys.executable, "-m", "tether", "parity", "--backends", "torch", "--device", "gpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no GPU found" in result.stdout


def test_markdown_tables_have_a_column_per_backend_and_a_table_per_problem():
    records = [
        record(problem="closed-loop", deviation=1e-15),
        record(backend="jax", problem="closed-loop", deviation=2e-15),
        record(problem="same-model", optimizer="adam_ftp", deviation=None, verdict="n/a"),
    ]
    text = parity.markdown_tables(records)
    assert "### closed-loop" in text and "### same-model" in text
    assert "| adam_spd | float64 | 1.0e-15 | 2.0e-15 |" in text
    assert "| adam_ftp | float64 | n/a | - |" in text
