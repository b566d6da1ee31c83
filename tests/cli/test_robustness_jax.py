"""`tether robustness --backend jax`: the flax LeNet-5 is the torch one, and every method runs and
trains as the torch backend does."""

import sys

import numpy as np
import pytest

from tether import robustness

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("mlxtend")
robust_jax = pytest.importorskip("tether._robust_jax")


@pytest.fixture(scope="module")
def task():
    return robustness.digits_task()


@pytest.fixture(scope="module")
def backends(task):
    pytest.importorskip("torch")
    from tether._robust_torch import TorchBackend

    return robust_jax.JaxBackend(task), TorchBackend(task)


def _small(task, n=120):
    """The task with at most `n` examples per split and OOD set (as `test_robustness._small`)."""

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


def test_the_layouts_convert_both_ways_exactly(task):
    params = robust_jax.to_flax(task.weights)
    assert params["conv1"]["kernel"].shape == (3, 3, 1, 32)
    assert params["conv2"]["kernel"].shape == (3, 3, 32, 64)
    assert params["linear1"]["kernel"].shape == (3136, 200)
    assert params["linear2"]["kernel"].shape == (200, 10)
    # linear1's inputs are reordered from PyTorch's (c, h, w) flatten to NHWC's (h, w, c)
    c, h, w, out = 5, 2, 3, 1
    np.testing.assert_array_equal(
        params["linear1"]["kernel"][(h * 7 + w) * 64 + c, out],
        task.weights["linear1.weight"][out, c * 49 + h * 7 + w],
    )
    back = robust_jax.to_torch(params)
    assert list(back) == list(task.weights)
    for name, value in task.weights.items():
        assert back[name].dtype == np.float32 and back[name].flags.c_contiguous
        np.testing.assert_array_equal(back[name], value)


def test_the_converted_network_predicts_what_the_torch_one_predicts(task, backends):
    import jax.numpy as jnp
    import torch

    jax_backend, torch_backend = backends
    for x, _ in (task.test, task.ood["mnist"]):
        np.testing.assert_array_equal(
            jax_backend.predict(task.weights, x), torch_backend.predict(task.weights, x)
        )
    x = task.ood["mnist"][0][:500]
    logits = jax_backend.net.apply(
        {"params": robust_jax.to_flax(task.weights)}, jnp.transpose(x, (0, 2, 3, 1))
    )
    with torch.no_grad():
        expected = torch_backend.model(task.weights)(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)


def _close(got, want, anchor):
    """Per tensor: within 1e-4 of the weights' norm, and the same displacement to 1e-3 of its norm."""
    for name, value in want.items():
        difference = np.linalg.norm(got[name] - value)
        assert difference <= 1e-4 * np.linalg.norm(value), name
        assert difference <= 1e-3 * np.linalg.norm(value - anchor[name]), name


@pytest.mark.parametrize(
    ("method", "hparams"),
    [
        ("adamw", {}),
        ("ftp", {}),
        ("spd", {"weight_decay": 1.0}),
        ("l2sp", {"alpha": 0.1}),
        ("marssp", {"radius": 0.5}),
        ("lpft", {}),
    ],
)
def test_a_few_steps_give_the_torch_backends_weights(task, backends, method, hparams):
    jax_backend, torch_backend = backends
    order = robustness.batch_order(len(task.train[1]), robustness.Budget(epochs=1, batch_size=40), 0)[:4]
    got = jax_backend.finetune(method, 1e-3, hparams, order, 0)
    want = torch_backend.finetune(method, 1e-3, hparams, order, 0)
    _close(got, want, task.weights)
    if method == "lpft":  # two probe steps move the head only; two AdamW steps move everything after
        probed = jax_backend.finetune("probe", 1e-3, {}, order[:2], 0)
        moved = {n for n in probed if not np.array_equal(probed[n], task.weights[n])}
        assert moved == set(task.head)
    if method == "marssp":  # a small radius: some rows are on the sphere
        for name, value in got.items():
            rows = np.abs(value - task.weights[name]).reshape(len(value), -1).sum(1)
            assert rows.max() <= 0.5 * (1 + 1e-5), name


def test_tpgm_gives_the_torch_backends_weights(task, backends):
    jax_backend, torch_backend = backends
    rng = np.random.default_rng(0)
    finetuned = {n: w + rng.normal(0, 0.02, w.shape).astype(np.float32) for n, w in task.weights.items()}
    order = robustness.batch_order(len(task.val[1]), robustness.Budget(epochs=1, batch_size=40), 0)[:3]
    got = jax_backend.tpgm(finetuned, 1e-2, order)
    want = torch_backend.tpgm(finetuned, 1e-2, order)
    _close(got, want, task.weights)
    assert robustness.deviation(got, task.weights)[0] < robustness.deviation(finetuned, task.weights)[0]


def test_every_method_runs_on_jax(task):
    task = _small(task)
    budget = robustness.Budget(epochs=2, batch_size=40, tpgm_iters=2)
    result = robustness.compare(task, seeds=1, budget=budget, backend="jax", selection=False)
    assert result["backend"] == "jax"
    assert [r["method"] for r in result["rows"]] == list(robustness.METHODS)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["pretrained"]["deviation"] == 0.0 and rows["pretrained"]["ood"]["mnist"] > 95
    for method, row in rows.items():
        if method != "pretrained":
            assert row["deviation"] > 0, method
            assert row["seconds"] > 0, method
        assert 0 <= row["id"] <= 100 and set(row["ood"]) == set(task.ood)
        assert set(row["drift"]) == set(task.weights)
    # TPGM projects AdamW's weights (the same run) toward the anchor; WiSE-FT mixes them with it
    assert rows["tpgm"]["deviation"] <= rows["adamw"]["deviation"]
    assert rows["wiseft"]["deviation"] <= rows["adamw"]["deviation"] * (1 + 1e-6)
    assert "| ftp" in robustness.format_table(result)


def test_without_flax_the_jax_backend_is_an_install_hint(task, monkeypatch):
    from tether._robust_digits import MissingExtra

    monkeypatch.delitem(sys.modules, "tether._robust_jax")
    monkeypatch.setitem(sys.modules, "flax.linen", None)
    with pytest.raises(MissingExtra, match=r'needs flax\.linen: pip install "tether\[jax,flax,robustness\]"'):
        robustness._backend("jax", task)
