"""The row axis of the per-row norms, 16-bit parameters and empty tensors (ALGORITHMS.md §1, §9)."""

import numpy as np
import pytest

from tether import core
from tether.core.reference import ReferenceOptimizer, closed_loop_problem

# --- which axis is a row ------------------------------------------------------------------------------


def test_mars_norm_on_the_last_axis_is_the_transposed_layouts_norm(backend):
    torch_layout = np.arange(24.0).reshape(4, 3, 2) - 11.0  # (out, in, k)
    keras_layout = np.transpose(torch_layout, (2, 1, 0))  # (k, in, out)
    first, last, negative = backend.call(
        lambda a, b: (
            core.mars_norm(a),
            core.mars_norm(b, row_axis=2),
            core.mars_norm(b, row_axis=-1),
        ),
        torch_layout,
        keras_layout,
    )
    assert first.shape == (4, 1, 1) and last.shape == negative.shape == (1, 1, 4)
    backend.close(last.ravel(), first.ravel())
    backend.close(negative.ravel(), first.ravel())


def test_rowdot_and_project_take_the_row_axis(backend):
    a = np.array([[1.0, -2.0, 3.0], [4.0, 0.5, -1.0]])  # (in, out) = (2, 3)
    b = np.array([[2.0, 1.0, -1.0], [1.0, 1.0, 1.0]])
    dots, projected, transposed = backend.call(
        lambda x, y: (
            core.rowdot(x, y, row_axis=-1),
            core.project(x, 2.0, row_axis=-1),
            core.project(x.T, 2.0),
        ),
        a,
        b,
    )
    backend.close(dots.ravel(), (a * b).sum(axis=0))
    backend.close(projected, transposed.T)


def test_mars_shape_and_row_axis_checks():
    assert core.mars_shape((3, 4), 0) == (3, 1)
    assert core.mars_shape((2, 2, 5, 7), -1) == (1, 1, 1, 7)
    assert core.mars_shape((5,), -1) == (1,) and core.mars_shape((), 3) == ()
    with pytest.raises(ValueError, match="row_axis 2"):
        core.mars_shape((3, 4), 2)
    with pytest.raises(TypeError, match="row_axis"):
        core.mars_norm(np.ones((2, 2)), row_axis=0.5)


@pytest.mark.parametrize("kind", ["adam_ftp", "sgd_ftp"])
def test_a_kernel_in_keras_layout_follows_the_torch_layouts_trajectory(kind):
    """The same layer in (out, in) with row_axis=0 and in (in, out) with row_axis=-1: same numbers."""
    problem = closed_loop_problem(seed=3, steps=8, shapes={"w": (5, 4), "conv": (3, 2, 2, 2)})
    hyper = {"lr": 0.05, "k": 0.7} | ({"momentum": 0.9} if kind == "sgd_ftp" else {})
    ref = ReferenceOptimizer(kind, problem.theta0, **hyper)
    flips = {"w": (1, 0), "conv": (2, 3, 1, 0)}  # torch → keras layout
    params = {n: np.transpose(p, flips[n]).copy() for n, p in problem.theta0.items()}
    states = {n: core.ftp_init(p, row_axis=-1) for n, p in params.items()}
    base = {n: core.adam_init(p) if kind == "adam_ftp" else core.sgd_init(p) for n, p in params.items()}
    for t in range(8):
        grads = {n: problem.gradient(n, p, t) for n, p in ref.params.items()}
        ref.step(grads)
        for n in params:
            g = np.transpose(grads[n], flips[n])
            if kind == "adam_ftp":
                d, base[n] = core.adam_direction(g, base[n], t + 1, lr=0.05)
            else:
                d, base[n] = core.sgd_direction(g, params[n], base[n], t + 1, lr=0.05, momentum=0.9)
            anchor = np.transpose(problem.theta0[n], flips[n])
            params[n], states[n] = core.ftp_project(
                params[n], d, anchor, g, states[n], t + 1, k=0.7, row_axis=-1
            )
    for n, p in params.items():
        np.testing.assert_allclose(np.transpose(p, np.argsort(flips[n])), ref.params[n], rtol=1e-12)
        assert float(states[n].radius) == pytest.approx(float(ref.radius(n)), rel=1e-12)


# --- 16-bit parameters: the statistics are float32 --------------------------------------------------


def _namespaces():
    out = [pytest.param("numpy", "float16", id="numpy-float16")]
    for name in ("torch", "jax"):
        for dtype in ("float16", "bfloat16"):
            out.append(pytest.param(name, dtype, id=f"{name}-{dtype}"))
    return out


def _array_module(name):
    if name == "numpy":
        return np, lambda a, dtype: np.asarray(a, dtype=dtype), lambda a: np.asarray(a, np.float64)
    if name == "torch":
        torch = pytest.importorskip("torch")

        def to(a, dtype):
            return torch.tensor(np.asarray(a, np.float64)).to(getattr(torch, dtype))

        return torch, to, lambda a: a.detach().to(torch.float64).numpy()
    jnp = pytest.importorskip("jax.numpy")
    return jnp, lambda a, dtype: jnp.asarray(a, dtype=dtype), lambda a: np.asarray(a, np.float64)


@pytest.mark.parametrize(("module", "dtype"), _namespaces())
def test_ftp_on_16_bit_keeps_float32_statistics_and_stays_finite(module, dtype):
    """A zero row (n = 0 + 1e-8, which float16 rounds to 0) and a tiny one must not make NaN."""
    _, to, back = _array_module(module)
    theta = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, -1.0]])
    direction = np.array([[1e-3, -2e-3, 0.0], [0.0, 0.0, 0.0]])  # second row: no step at all
    grad = np.array([[0.1, -0.2, 0.0], [0.0, 0.0, 0.0]])
    param = to(theta, dtype)
    state = core.ftp_init(param)
    assert state.prev_inv_norm.dtype == state.radius.dtype  # float32, not the parameter's dtype
    trace = []
    for step in range(1, 6):
        d = to(direction * step, dtype)
        param, state = core.ftp_project(param, d, to(theta, dtype), to(grad, dtype), state, step)
        trace.append(back(param))
        assert param.dtype == to(theta, dtype).dtype
    assert np.all(np.isfinite(np.stack(trace)))
    assert np.all(np.isfinite(back(state.prev_inv_norm)))
    np.testing.assert_allclose(trace[-1][1], theta[1], atol=0)  # the still row stays put


@pytest.mark.parametrize(("module", "dtype"), _namespaces())
def test_spd_on_16_bit_measures_in_float32(module, dtype):
    """⟨g, θ − θ₀⟩ of small values underflows in float16, and ‖·‖₂'s sum of squares loses the ratio."""
    _, to, back = _array_module(module)
    rng = np.random.default_rng(0)
    anchor = rng.standard_normal(4000)
    theta = anchor + 1e-3 * rng.standard_normal(4000)
    grad = 1e-4 * np.sign(theta - anchor)  # pushes away: the decay fires
    stats = core.spd_statistics(to(theta, dtype), to(anchor, dtype), to(grad, dtype))
    assert back(stats.alignment) > 0 and stats.alignment.dtype == stats.distance.dtype
    exact = core.spd_statistics(
        back(to(theta, dtype)), back(to(anchor, dtype)), back(to(grad, dtype))
    )  # the same 16-bit values, measured in float64
    np.testing.assert_allclose(back(stats.distance), exact.distance, rtol=1e-5)
    np.testing.assert_allclose(back(stats.alignment), exact.alignment, rtol=1e-4)


# --- empty tensors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5), (0,), (3, 0, 2)])
def test_ftp_on_an_empty_tensor_changes_nothing(shape):
    param = np.zeros(shape)
    state = core.ftp_init(param)
    new, new_state = core.ftp_project(param, param, param, param, state, 1)
    assert new.shape == shape and new_state is state
    spd = core.spd_step(param, param, param, param, 1.0)
    assert spd.shape == shape
