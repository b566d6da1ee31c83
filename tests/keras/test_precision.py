"""16-bit variables, empty variables, and variables that cannot be stepped (complex, integer, bool)."""

import keras
import numpy as np
import pytest
from test_parity import OPTIMIZERS, numpy

from tether.adapters import keras as tk

BACKEND = keras.backend.backend()
KINDS = sorted(OPTIMIZERS)


def hard_gradients(steps, small, seed=3):
    """Gradients of a (6, 4) kernel and a (4,) bias, with a zero row and two rows of about ``small``."""
    rng = np.random.default_rng(seed)
    grads = []
    for _ in range(steps):
        kernel = rng.standard_normal((6, 4))
        kernel[1] = 0.0  # no gradient: the displacement's row stays 0, its 1/n is 1e8
        kernel[2:4] *= small
        grads.append({"kernel": kernel, "bias": rng.standard_normal(4)})
    return grads


def run(kind, dtype, grads, **kwargs):
    rng = np.random.default_rng(0)
    start = {"kernel": rng.standard_normal((6, 4)), "bias": rng.standard_normal(4)}
    variables = {n: keras.Variable(p, dtype=dtype, name=n) for n, p in start.items()}
    hparams = dict(learning_rate=0.05, momentum=0.9) if kind == "sgd_ftp" else dict(learning_rate=0.05)
    optimizer = OPTIMIZERS[kind](**hparams, **kwargs)
    for step in grads:
        optimizer.apply_gradients(
            [(keras.ops.convert_to_tensor(step[n], dtype=dtype), v) for n, v in variables.items()]
        )
    return variables, optimizer


@pytest.mark.parametrize("row_axis", [None, 0])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_16_bit_variables_stay_finite_and_track_float32(kind, dtype, row_axis):
    """FTP keeps 1/n in float32: in float16 a zero row's 1e8 overflows, and the radius goes NaN.

    SGD's small rows (1e-6) make small displacements (1/n overflows too). Adam's moments keep
    the variable's dtype, and float16's v = (1 − β₂)g² underflows to 0 for |g| below about
    8e-3 (then m / √v is far from float32's): Adam's small rows are 2e-2.
    """
    kwargs = {} if kind == "adam_spd" or row_axis is None else dict(row_axis=row_axis)
    grads = hard_gradients(steps=8, small=1e-6 if kind == "sgd_ftp" else 2e-2)
    low, optimizer = run(kind, dtype, grads, **kwargs)
    wide, _ = run(kind, "float32", grads, **kwargs)
    for n, variable in low.items():
        assert keras.backend.standardize_dtype(variable.dtype) == dtype
        value = numpy(variable).astype(np.float64)
        assert np.all(np.isfinite(value)), n
        np.testing.assert_allclose(value, numpy(wide[n]), rtol=0, atol=0.03)
    if kind != "adam_spd":
        for state in optimizer._ftp:
            assert keras.backend.standardize_dtype(state.prev_inv_norm.dtype) == "float32"
            assert np.all(np.isfinite(numpy(state.prev_inv_norm)))
            assert np.isfinite(numpy(state.radius))


@pytest.mark.parametrize("kind", KINDS)
def test_empty_variables_are_skipped(kind):
    """Nothing to update in a (0, 5) or (0,) variable: the others step as without them."""
    rng = np.random.default_rng(1)
    start = rng.standard_normal((3, 4)).astype("float32")
    grads = [rng.standard_normal((3, 4)).astype("float32") for _ in range(3)]
    hparams = dict(learning_rate=0.05, momentum=0.9) if kind == "sgd_ftp" else dict(learning_rate=0.05)

    def steps(with_empty):
        weight = keras.Variable(start, name="weight")
        empty = [
            keras.Variable(np.zeros(s, "float32"), name=f"empty{i}") for i, s in enumerate([(0, 5), (0,)])
        ]
        variables = [empty[0], weight, empty[1]] if with_empty else [weight]
        optimizer = OPTIMIZERS[kind](**hparams)
        for g in grads:
            optimizer.apply_gradients(
                [
                    (keras.ops.convert_to_tensor(g) if v is weight else keras.ops.zeros(v.shape), v)
                    for v in variables
                ]
            )
        for v in empty:
            assert tuple(v.shape) in ((0, 5), (0,))
        return numpy(weight), optimizer

    got, optimizer = steps(with_empty=True)
    expected, _ = steps(with_empty=False)
    np.testing.assert_array_equal(got, expected)
    assert [int(numpy(s)) for s in optimizer._steps] == [0, 3, 0]


def snapshot(variables, optimizer):
    return [numpy(v).copy() for v in variables] + [numpy(v).copy() for v in optimizer.variables]


def creatable(dtype):
    """Whether this backend makes a trainable variable of ``dtype`` (torch: floating and complex only)."""
    try:
        keras.Variable(np.ones(2), dtype=dtype, trainable=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("dtype", ["complex64", "int32", "bool"])
@pytest.mark.parametrize("kind", KINDS)
def test_variables_that_cannot_be_stepped_raise_before_any_update(kind, dtype):
    if not creatable(dtype):
        pytest.skip(f"the {BACKEND} backend makes no trainable {dtype} variable")
    first = keras.Variable(np.ones((2, 3), "float32"), name="first")
    odd = keras.Variable(np.ones((2, 3)), dtype=dtype, name="odd")
    optimizer = OPTIMIZERS[kind]()
    before = snapshot([first, odd], optimizer)
    with pytest.raises(TypeError, match=f"`odd` is {dtype}"):
        optimizer.apply_gradients(
            [(keras.ops.ones((2, 3)), first), (keras.ops.ones((2, 3), dtype=dtype), odd)]
        )
    assert not optimizer.built
    for a, b in zip(before, snapshot([first, odd], optimizer), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_a_complex_gradient_raises_before_any_update(kind):
    """Built on real variables, a step whose last gradient is complex changes nothing at all."""
    variables = [keras.Variable(np.ones((2, 3), "float32"), name=n) for n in ("first", "second")]
    optimizer = OPTIMIZERS[kind](learning_rate=0.1)
    optimizer.apply_gradients([(keras.ops.ones((2, 3)), v) for v in variables])
    before = snapshot(variables, optimizer)
    grads = [keras.ops.ones((2, 3)), keras.ops.ones((2, 3), dtype="complex64")]
    with pytest.raises(TypeError, match="gradient of `second` is complex64"):
        optimizer.apply_gradients(zip(grads, variables))
    for a, b in zip(before, snapshot(variables, optimizer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_16_bit_state_dtypes():
    """Moments, anchor and c_prev keep the variable's dtype; the radius and 1/n are float32."""
    variable = keras.Variable(np.ones((3, 2), "float32"), dtype="float16", name="kernel")
    optimizer = tk.AdamFTP()
    optimizer.build([variable])
    state = optimizer._ftp[0]
    dtypes = {n: keras.backend.standardize_dtype(s.dtype) for n, s in state._asdict().items()}
    assert dtypes == {
        "radius": "float32",
        "radius_exp_avg": "float32",
        "radius_exp_avg_sq": "float32",
        "prev_displacement": "float16",
        "prev_inv_norm": "float32",
    }
    assert keras.backend.standardize_dtype(optimizer._anchors[0].dtype) == "float16"
    assert tuple(state.prev_inv_norm.shape) == (1, 2)
