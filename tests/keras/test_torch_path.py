"""On the torch backend, float32/float64 variables take the in-place multi-tensor path.

That path (``adapters/_keras_torch.py``) runs the PyTorch adapter's kernels on the Keras
variables' tensors; the generic per-variable ``update_step`` remains for the others. These
tests check that the path is taken where it should be, that it equals the generic path and
the reference, and that it keeps the learning rate on the device (a zero rate included).
"""

import keras
import numpy as np
import pytest
from test_parity import CONFIGS, OPTIMIZERS, TOL, keras_hparams, make_variables, numpy, run_pair

from tether.core.reference import ReferenceOptimizer, closed_loop_problem

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="the torch backend's path")

if keras.backend.backend() == "torch":
    from tether.adapters import _keras_torch

KERNELS = {"adam_ftp": "adam_ftp_step_", "sgd_ftp": "sgd_ftp_step_", "adam_spd": "adam_spd_step_"}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the calls of each bucket kernel of ``_torch_ops`` made through the Keras adapter."""
    calls = dict.fromkeys(KERNELS.values(), 0)
    for name in calls:
        kernel = getattr(_keras_torch._torch_ops, name)

        def counting(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(_keras_torch._torch_ops, name, counting)
    return calls


@pytest.mark.filterwarnings("ignore:.*anchors variables that are not zero")  # parity on purpose
@pytest.mark.parametrize(("kind", "hparams", "anchor", "unanchored"), CONFIGS)
def test_float64_takes_the_in_place_path(float64, kernel_calls, kind, hparams, anchor, unanchored):
    assert run_pair(kind, hparams, anchor, unanchored, steps=4) <= TOL
    buckets = 2 if unanchored else 1  # an unanchored variable is a bucket of its own
    assert kernel_calls[KERNELS[kind]] == 4 * buckets


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_16_bit_variables_take_the_generic_path(kernel_calls, kind):
    optimizer = OPTIMIZERS[kind]()
    variable = keras.Variable(np.ones((3, 2)), dtype="bfloat16")
    optimizer.apply_gradients([(keras.ops.ones((3, 2), dtype="bfloat16"), variable)])
    assert sum(kernel_calls.values()) == 0
    assert int(numpy(optimizer._steps[0])) == 1


def _float32_run(kind, hparams, in_place, monkeypatch, steps=6):
    if not in_place:
        monkeypatch.setattr(_keras_torch, "_in_place", lambda gradient, variable: False)
    problem = closed_loop_problem(seed=21, steps=steps, dtype=np.float32)
    variables = {
        n: keras.Variable(p, dtype="float32", name=n.replace(".", "_")) for n, p in problem.theta0.items()
    }
    optimizer = OPTIMIZERS[kind](**keras_hparams(hparams))
    optimizer.exclude_from_anchor(var_names=["head"])
    for t in range(steps):
        grads = [keras.ops.convert_to_tensor(problem.gradient(n, numpy(v), t)) for n, v in variables.items()]
        optimizer.apply_gradients(zip(grads, variables.values(), strict=True))
    monkeypatch.undo()
    return {n: numpy(v) for n, v in variables.items()}


@pytest.mark.parametrize(("kind", "hparams"), [(c[0], c[1]) for c in CONFIGS])
def test_float32_in_place_path_equals_generic_path(monkeypatch, kind, hparams):
    fast = _float32_run(kind, hparams, True, monkeypatch)
    generic = _float32_run(kind, hparams, False, monkeypatch)
    for n in fast:
        np.testing.assert_allclose(fast[n], generic[n], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_zero_learning_rate_from_a_warmup_schedule(float64, kernel_calls, kind):
    """Warm-up from 0: the first step's rate is exactly 0 (a tensor, folded in without 0·∞)."""
    steps = 5
    schedule = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=10, warmup_target=0.05, warmup_steps=3)
    hparams = dict(momentum=0.9) if kind == "sgd_ftp" else dict(weight_decay=0.5)
    problem = closed_loop_problem(seed=4, steps=steps)
    variables = make_variables(problem)
    optimizer = OPTIMIZERS[kind](learning_rate=schedule, **hparams)
    reference = ReferenceOptimizer(kind, problem.theta0, lr=0.0, **hparams)
    for t in range(steps):
        grads = {n: problem.gradient(n, numpy(v), t) for n, v in variables.items()}
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(grads[n]), v) for n, v in variables.items()])
        reference.hparams["lr"] = float(numpy(schedule(t)))
        expected = reference.step(grads)
        for n, v in variables.items():
            assert np.all(np.isfinite(numpy(v)))
            np.testing.assert_allclose(numpy(v), expected[n], rtol=0, atol=TOL)
    assert float(numpy(schedule(0))) == 0.0
    assert kernel_calls[KERNELS[kind]] == steps


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_stateless_apply_leaves_the_variables_alone(float64, kind):
    """Under a StatelessScope the values are not the variables' tensors: the generic path runs."""
    problem = closed_loop_problem(seed=8, steps=1)
    variables = make_variables(problem)
    var_list = list(variables.values())
    optimizer = OPTIMIZERS[kind](learning_rate=0.05)
    optimizer.build(var_list)
    before = [numpy(v).copy() for v in var_list]
    grads = [keras.ops.convert_to_tensor(problem.gradient(n, numpy(v), 0)) for n, v in variables.items()]
    values, _ = optimizer.stateless_apply(
        [v.value for v in optimizer.variables], grads, [v.value.detach().clone() for v in var_list]
    )
    for variable, value in zip(var_list, before, strict=True):
        np.testing.assert_array_equal(numpy(variable), value)
    reference = ReferenceOptimizer(kind, problem.theta0, lr=0.05)
    expected = reference.step({n: numpy(g) for n, g in zip(variables, grads, strict=True)})
    for n, value in zip(variables, values, strict=True):
        np.testing.assert_allclose(numpy(value), expected[n], rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", ["adam_ftp", "sgd_ftp"])
def test_kernel_rows_moved_first_take_the_in_place_path(float64, kernel_calls, kind):
    """A Dense kernel's rows are its last axis: the kernels step views with that axis first."""
    from test_layout import TO_TORCH, dense, run_against_reference

    layer = dense()
    variables = {"kernel": layer.kernel, "bias": layer.bias}
    assert run_against_reference(kind, variables, {"kernel": TO_TORCH[2], "bias": (0,)}, steps=4) <= TOL
    # the kernel (rows moved) and the bias are buckets of their own
    assert kernel_calls[KERNELS[kind]] == 4 * 2


def _moved_rows_run(kind, in_place, monkeypatch, shapes, steps=4):
    """Float32 FTP on ``kernel`` variables (rows last) and a bias; the taken C-kernel buckets."""
    if not in_place:
        monkeypatch.setattr(_keras_torch, "_in_place", lambda gradient, variable: False)
    taken = []
    kernels_take = _keras_torch._torch_ops.kernels_take

    def recording(*tensor_lists, **options):
        taken.append((tuple(tensor_lists[0][0].shape), kernels_take(*tensor_lists, **options)))
        return taken[-1][1]

    monkeypatch.setattr(_keras_torch._torch_ops, "kernels_take", recording)
    problem = closed_loop_problem(seed=23, steps=steps, shapes=shapes, dtype=np.float32)
    variables = {
        n: keras.Variable(p, dtype="float32", name=n.split(".")[0]) for n, p in problem.theta0.items()
    }
    hparams = dict(learning_rate=0.05, momentum=0.9) if kind == "sgd_ftp" else dict(learning_rate=0.01)
    optimizer = OPTIMIZERS[kind](**hparams)
    for t in range(steps):
        grads = [keras.ops.convert_to_tensor(problem.gradient(n, numpy(v), t)) for n, v in variables.items()]
        optimizer.apply_gradients(zip(grads, variables.values(), strict=True))
    monkeypatch.undo()
    return {n: numpy(v) for n, v in variables.items()}, taken


@pytest.mark.parametrize("kind", ["adam_ftp", "sgd_ftp"])
def test_moved_rows_in_place_equal_the_generic_path(monkeypatch, kind):
    """Views with the rows first are not contiguous: no C kernel and no blocks, the same numbers.

    The large kernel (more values than `_torch_ops.BLOCK`) would be stepped a block of rows
    at a time if it were contiguous; the bias bucket keeps the C kernels.
    """
    shapes = {"kernel.0": (700, 400), "kernel.1": (2, 3, 5), "bias": (5,)}
    fast, taken = _moved_rows_run(kind, True, monkeypatch, shapes)
    generic, _ = _moved_rows_run(kind, False, monkeypatch, shapes)
    for n in fast:
        np.testing.assert_allclose(fast[n], generic[n], rtol=2e-5, atol=1e-6)
    moved = [took for shape, took in taken if shape == (400, 700)]
    assert moved and not any(moved)
    if _keras_torch._torch_ops._kernels is not None:
        assert all(took for shape, took in taken if shape == (5,))
