"""`tether bench`: the table, --json, skipped backends, crashes, usage errors, and a real torch run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tether import bench
from tether.__main__ import main


def row(backend="torch", optimizer="AdamSPD", baseline="torch AdamW(foreach)", ms=12.5, ratio=1.25):
    return {
        "backend": backend,
        "device": "cpu",
        "optimizer": optimizer,
        "baseline": baseline,
        "ms": ms,
        "baseline_ms": ms / ratio,
        "ratio": ratio,
        "state_bytes_per_param": 12.0,
        "baseline_state_bytes_per_param": 8.0,
    }


def test_the_table_has_every_column_and_formats_the_numbers():
    text = bench.format_table([row(), row(optimizer="SGDFTP", baseline="torch SGD", ms=3.21, ratio=3.0)])
    lines = text.splitlines()
    for title in (
        "backend",
        "device",
        "optimizer",
        "baseline",
        "ms",
        "baseline ms",
        "ratio",
        "state B/param",
    ):
        assert title in lines[0]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 4
    assert "12.5" in lines[2] and "10.0" in lines[2] and "1.25x" in lines[2] and "12.0" in lines[2]
    assert "3.21" in lines[3] and "3.00x" in lines[3] and "8.00" in lines[3]


def test_json_rows_and_a_backend_that_is_not_installed_is_skipped(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "installed", lambda backend: backend == "torch")
    monkeypatch.setattr(bench, "run_backend", lambda *a: ([row(), row(optimizer="AdamFTP")], ["cpu"], None))
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "AdamFTP" in printed.out and "1.25x" in printed.out
    assert "keras/jax: skipped, not installed" in printed.err
    result = json.loads(out.read_text())
    assert result["backends"]["torch"] == "measured"
    assert result["backends"]["jax"] == "skipped (not installed)"
    assert [r["optimizer"] for r in result["rows"]] == ["AdamSPD", "AdamFTP"]


def test_a_crashed_worker_makes_the_exit_status_1(monkeypatch, capsys):
    monkeypatch.setattr(bench, "installed", lambda backend: backend == "jax")
    monkeypatch.setattr(bench, "run_backend", lambda *a: ([], ["cpu"], "worker exited with status 1"))
    assert main(["bench", "--device", "cpu"]) == 1
    assert "ERROR jax" in capsys.readouterr().out


def test_no_gpu_is_said_plainly(monkeypatch, capsys):
    monkeypatch.setattr(bench, "installed", lambda backend: backend == "torch")
    monkeypatch.setattr(bench, "run_backend", lambda *a: ([], [], None))
    assert main(["bench", "--device", "gpu"]) == 0
    assert "no GPU found" in capsys.readouterr().out


def test_usage_errors_exit_with_status_2(capsys):
    assert main(["bench", "--backends", "mxnet"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "tpu"])
    assert exc.value.code == 2


def test_a_real_quick_torch_run(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "tether", "bench", "--quick", "--backends", "torch", "--device", "cpu"]
    result = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["optimizer"] for r in rows] == [
        "torch AdamW(foreach)", "AdamSPD", "AdamFTP", "FTP(AdamW(fused))", "SPD(Adam(fused))",
        "torch SGD(momentum=0.9, foreach)", "SGDFTP",
    ]  # fmt: skip
    assert {r["baseline"] for r in rows} == {"torch AdamW(fused)", "torch SGD(momentum=0.9, fused)"}
    floors = {r["optimizer"]: r["floor"] for r in rows}
    assert floors["AdamSPD"] == pytest.approx(11 / 7) and floors["SGDFTP"] == pytest.approx(2.0)
    # --quick: every tensor in cache, no traffic to weigh
    assert all(r["traffic_ratio"] is None for r in rows)
    for r in rows:  # speeds are never asserted: only that they were measured
        assert r["backend"] == "torch" and r["device"] == "cpu"
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["ratio"] > 0
        assert (r["foreach_ratio"] is None) == ("foreach" in r["optimizer"])
        assert r["state_bytes_per_param"] > 0 and r["baseline_state_bytes_per_param"] > 0
    from tether._bench_torch import kernels_state

    assert {r["kernels"] for r in rows} == {kernels_state()}
    assert f"ran the C kernels: {kernels_state()}." in result.stdout
    assert "AdamSPD" in result.stdout


def test_the_lora_model_is_peft_s_adapters_of_a_7b_decoder():
    torch = pytest.importorskip("torch")
    from tether._bench_torch import lora_shapes, shapes_for

    lora_a = torch.nn.Linear(4096, 8, bias=False).weight  # PEFT's lora_A: the input to rank 8
    lora_b = torch.nn.Linear(8, 4096, bias=False).weight  # lora_B: rank 8 to the output
    shapes = lora_shapes()
    assert shapes[:2] == [tuple(lora_a.shape), tuple(lora_b.shape)]
    assert len(shapes) == 32 * 4 * 2 and set(shapes) == set(shapes[:2])  # q, k, v, o of 32 layers
    assert sum(math.prod(s) for s in shapes) == 256 * 8 * 4096
    assert shapes_for(True, "lora") == lora_shapes(layers=2, width=256, rank=8)
    assert shapes_for(False) == shapes_for(False, "vit-b16")


def test_the_script_measures_the_lora_model():
    pytest.importorskip("torch")
    script = Path(__file__).parents[2] / "benchmarks" / "bench_torch.py"
    cmd = [sys.executable, str(script), "--quick", "--model", "lora", "--repeats", "1", "--warmup", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("lora: 16 tensors, 0.0M parameters")
    assert "| AdamFTP |" in result.stdout and "| SGDFTP |" in result.stdout


def test_the_traffic_here_weighs_each_steps_passes_by_their_kind():
    torch_bench = pytest.importorskip("tether._bench_torch")
    adam, sgd = torch_bench.ADAM, torch_bench.SGD
    for name, lines in torch_bench.LINES.items():  # the same passes as the floor's, sorted by kind
        assert sum(lines) == torch_bench.PASSES[name], name
    assert set(torch_bench.LINES) == {name for name in torch_bench.PASSES if "foreach" not in name}
    reads_only = {"read": 2.0, "write_back": 0.0, "stream": 0.0}
    assert torch_bench.traffic("AdamFTP", adam, reads_only) == pytest.approx(8 / 4)
    assert torch_bench.traffic("SGDFTP", sgd, reads_only) == pytest.approx(7 / 3)
    alike = {"read": 1.0, "write_back": 1.0, "stream": 1.0}  # every pass alike: the floor
    for builders in (adam, sgd):
        for name in builders:
            if name in torch_bench.LINES:
                floor = torch_bench.floor(name, builders)
                assert torch_bench.traffic(name, builders, alike) == pytest.approx(floor)
    assert torch_bench.traffic("torch AdamW(foreach)", adam, alike) is None
    assert torch_bench.traffic("AdamFTP", adam, None) is None


def test_the_costs_of_a_pass_are_measured_on_a_cpu_with_the_kernels(monkeypatch):
    torch = pytest.importorskip("torch")
    torch_bench = pytest.importorskip("tether._bench_torch")
    from tether.adapters import _torch_ops

    shapes = [(300, 400), (1000,)]
    if _torch_ops._kernels is not None:
        costs = torch_bench.line_costs(shapes, torch.device("cpu"), repeats=3)
        assert set(costs) == {"read", "write_back", "stream"}
        assert costs["read"] > 0 and costs["write_back"] >= 0 and costs["stream"] >= 0
    assert torch_bench.line_costs(shapes, torch.device("meta"), repeats=3) is None
    monkeypatch.setattr(_torch_ops, "_kernels", None)  # no streaming stores to time
    assert torch_bench.line_costs(shapes, torch.device("cpu"), repeats=3) is None
