"""TPGM's pieces (ALGORITHMS.md §7) and the baselines (§8), on every backend of conftest.py."""

import numpy as np
import pytest

from tether import core


def test_tpgm_norms(backend):
    c = np.array([[3.0, -4.0], [0.0, 1.0], [-1.0, -1.0]])
    mars, l2, last = backend.call(
        lambda x: (
            core.tpgm_norm(x, "mars"),
            core.tpgm_norm(x, "l2"),
            core.tpgm_norm(x, "mars", row_axis=-1),
        ),
        c,
    )
    assert mars.shape == (3, 1) and l2.shape == () and last.shape == (1, 2)
    backend.close(mars.ravel(), [7.0, 1.0, 2.0])
    backend.close(l2, np.sqrt(28.0))
    backend.close(last.ravel(), [4.0, 6.0])


def test_constraint_init_clip_and_ratio(backend):
    n = np.array([[7.0], [1.0], [2.0]])

    def pieces(norm):
        gamma = core.initial_constraint(norm)
        return (
            gamma,
            core.clip_constraint(gamma * 0 + 100.0, norm),
            core.clip_constraint(gamma * 0 - 5.0, norm),
            core.projection_ratio(gamma * 0 + 1.5, norm),
        )

    gamma, high, low, ratio = backend.call(pieces, n)
    backend.close(gamma, 0.5)  # min(n) / 2
    backend.close(high, 7.0)  # max n
    backend.close(low, 1e-8, rtol=1e-6)
    backend.close(ratio.ravel(), [1.5 / (7 + 1e-8), 1.0, 1.5 / (2 + 1e-8)])


def test_tpgm_project(backend):
    theta0 = np.array([[1.0, 1.0], [0.0, 0.0]])
    theta = np.array([[4.0, -3.0], [0.5, 0.0]])  # c rows: (3, −4) n=7; (0.5, 0) n=0.5

    def run(t, a):
        mars = core.tpgm_project(t, a, a[0, 0] * 0 + 3.5, "mars")
        l2 = core.tpgm_project(t, a, a[0, 0] * 0 + 100.0, "l2")
        zero = core.tpgm_project(t, None, a[0, 0] * 0 + 3.5, "mars")
        return mars, l2, zero

    (mars, gamma), (l2, gamma_l2), (zero, _) = backend.call(run, theta, theta0)
    expected = theta0 + np.array([[3.0, -4.0], [0.5, 0.0]]) * np.array([[3.5 / (7 + 1e-8)], [1.0]])
    backend.close(mars, expected)
    backend.close(gamma, 3.5)
    n = np.sqrt(25.25)
    backend.close(gamma_l2, n)  # clipped to max n
    backend.close(l2, theta0 + (theta - theta0) * (n / (n + 1e-8)))
    backend.close(zero[1], [0.5, 0.0])  # a zero anchor projects θ itself: row 2's n = 0.5 < 3.5


def test_ratio_derivative_is_the_authors():
    """d r / d γ = 1 / (n + 1e-8) where 0 < r < 1, else 0 (jax and torch autodiff)."""
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")
    n = np.array([[7.0], [1.0], [2.0]])
    expected = np.where(1.5 / (n + 1e-8) < 1, 1 / (n + 1e-8), 0.0).ravel()
    jnp = jax.numpy
    jac = jax.jacobian(lambda g: core.projection_ratio(g, jnp.asarray(n, jnp.float32)).ravel())(
        jnp.float32(1.5)
    )
    np.testing.assert_allclose(np.asarray(jac), expected, rtol=1e-6)
    gamma = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    ratio = core.projection_ratio(gamma, torch.tensor(n))
    grads = [torch.autograd.grad(r, gamma, retain_graph=True)[0].item() for r in ratio.ravel()]
    np.testing.assert_allclose(grads, expected, rtol=1e-12)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        core.tpgm_norm(np.ones(3), "linf")


# --- §8 baselines -------------------------------------------------------------------------------


def test_l2_sp_gradient(backend):
    g, theta, theta0 = np.array([1.0, -1.0]), np.array([2.0, 0.5]), np.array([1.0, 1.0])
    anchored, zero = backend.call(
        lambda a, b, c: (core.l2_sp_gradient(a, b, c, 0.1), core.l2_sp_gradient(a, b, None, 0.1)),
        g,
        theta,
        theta0,
    )
    backend.close(anchored, g + 0.1 * (theta - theta0))
    backend.close(zero, g + 0.1 * theta)


def test_mars_sp_projects_rows_outside_the_fixed_radius(backend):
    theta0 = np.zeros((2, 2)) + 1.0
    theta = np.array([[4.0, -3.0], [1.5, 1.0]])  # c rows: (3, −4) n=7 → onto 2; (0.5, 0) n=0.5 stays

    def run(t, a):
        return core.mars_sp_project(t, a, 2.0), core.mars_sp_project(t.T, a.T, 2.0, row_axis=-1)

    rows, columns = backend.call(run, theta, theta0)
    backend.close(rows, theta0 + np.array([[3.0, -4.0], [0.5, 0.0]]) * np.array([[2.0 / 7.0], [1.0]]))
    backend.close(columns.T, rows)


def test_wise_ft_interpolates(backend):
    theta0, theta = np.array([0.0, 2.0]), np.array([1.0, -2.0])
    out = backend.call(
        lambda a, b: tuple(core.wise_ft(a, b, alpha) for alpha in (0.0, 0.25, 1.0)), theta0, theta
    )
    backend.close(out[0], theta0)
    backend.close(out[1], 0.75 * theta0 + 0.25 * theta)
    backend.close(out[2], theta)


def test_wise_ft_in_bfloat16_mixes_in_float32():
    torch = pytest.importorskip("torch")
    theta0 = torch.full((4,), 1.0, dtype=torch.bfloat16)
    theta = torch.full((4,), 1.0078125, dtype=torch.bfloat16)  # the next bfloat16 above 1
    mixed = core.wise_ft(theta0, theta, 0.75)
    assert mixed.dtype == torch.bfloat16
    assert torch.equal(mixed, torch.full((4,), 1.0078125, dtype=torch.bfloat16))  # 1.00586 rounds up
