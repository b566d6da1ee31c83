"""The core, rule by rule (ALGORITHMS.md §1–§6), on every backend of conftest.py.

Hand-computed cases pin each rule of the spec; hypothesis checks the properties
the methods promise. Every case runs through ``backend.call``, so it runs on
NumPy (float32, float64), array_api_strict, jax.numpy under jit and torch under
torch.compile(fullgraph=True).
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from tether import core
from tether.core import FTPState

PROPERTY = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def tensors(min_dims=0, max_dims=4):
    shapes = array_shapes(min_dims=min_dims, max_dims=max_dims, max_side=4)
    return arrays(np.float64, shapes, elements=st.floats(-10, 10))


def ftp_state(param, *, radius=0.0, m=0.0, v=0.0, prev_displacement=None, prev_inv_norm=None):
    """An FTPState built in NumPy (the backend converts it)."""
    prev_displacement = np.zeros_like(param) if prev_displacement is None else prev_displacement
    if prev_inv_norm is None:
        prev_inv_norm = np.zeros_like(core.mars_norm(np.asarray(param)))
    return FTPState(np.float64(radius), np.float64(m), np.float64(v), prev_displacement, prev_inv_norm)


# --- §1 norms -------------------------------------------------------------------------------------


def test_mars_norm_follows_the_rank_rules(backend):
    scalar = np.array(-3.0)
    bias = np.array([1.0, -2.0, 3.0])
    matrix = np.array([[1.0, -2.0], [3.0, 4.0], [0.0, -0.5]])
    kernel = np.arange(24.0).reshape(2, 3, 2, 2) - 12.0
    out = backend.call(
        lambda s, b, m, k: tuple(core.mars_norm(x) for x in (s, b, m, k)), scalar, bias, matrix, kernel
    )
    assert out[0].shape == () and out[0] == 3.0
    assert out[1].shape == (1,)
    backend.close(out[1], [6.0])  # a bias's MARS norm is its whole L1 norm
    assert out[2].shape == (3, 1)
    backend.close(out[2][:, 0], [3.0, 7.0, 0.5])
    assert out[3].shape == (2, 1, 1, 1)
    backend.close(out[3].ravel(), np.abs(kernel).reshape(2, -1).sum(axis=1))


def test_l2_norm_and_rowdot(backend):
    a = np.array([[3.0, 4.0], [1.0, 2.0]])
    b = np.array([[1.0, -1.0], [2.0, 0.5]])
    norm, rows, vec = backend.call(
        lambda a, b: (core.l2_norm(a), core.rowdot(a, b), core.rowdot(a[0, :], b[0, :])), a, b
    )
    backend.close(norm, math.sqrt(9 + 16 + 1 + 4))
    assert rows.shape == (2, 1)
    backend.close(rows[:, 0], [-1.0, 3.0])
    assert vec.shape == (1,)
    backend.close(vec, [-1.0])


# --- §2 projection ----------------------------------------------------------------------------------


def test_projection_scales_only_the_rows_outside_the_ball(backend):
    c = np.array([[3.0, -1.0], [0.5, 0.25]])  # row L1 norms 4 and 0.75
    out = backend.call(lambda c: core.project(c, 2.0), c)
    backend.close(out, [[1.5, -0.5], [0.5, 0.25]])


@PROPERTY
@given(c=tensors(), radius=st.floats(1e-3, 20.0))
def test_projection_lands_within_the_radius_and_is_idempotent(backend, c, radius):
    once, twice, norm = backend.call(
        lambda c: (lambda p: (p, core.project(p, radius), core.mars_norm(p)))(core.project(c, radius)), c
    )
    assert np.all(norm <= radius * (1 + 10 * backend.rtol) + 1e-12)
    backend.close(twice, once, atol=1e-12)


@PROPERTY
@given(c=tensors())
def test_projection_inside_the_ball_is_a_no_op(backend, c):
    radius = float(np.max(core.mars_norm(c))) + 1.0
    out = backend.call(lambda c: core.project(c, radius), c)
    backend.close(out, c, atol=1e-12)


# --- §3 base steps --------------------------------------------------------------------------------


def test_adam_first_step_is_lr_times_the_sign(backend):
    g = np.array([0.5, -2.0, 0.0])
    state = core.adam_init(g)
    d, new = backend.call(lambda g, s: core.adam_direction(g, s, 1, lr=0.1, eps=1e-8), g, state)
    # m = 0.1 g, v = 0.001 g², so m̂ = g and √v̂ = |g|: d = lr · g / (|g| + ε)
    backend.close(d, 0.1 * g / (np.abs(g) + 1e-8))
    backend.close(new.exp_avg, 0.1 * g)
    backend.close(new.exp_avg_sq, 0.001 * g * g)
    assert new.max_exp_avg_sq is None


def test_adam_epsilon_hat_is_added_before_the_bias_correction(backend):
    """Keras's ε̂ is PyTorch's ε scaled by √(1 − β₂ᵗ): the same direction, at any step."""
    g1, g2 = np.array([0.5, -2.0, 1e-3]), np.array([0.2, 1.0, -1e-3])
    beta2, eps = 0.999, 1e-2
    state = core.adam_init(g1)
    _, state = core.adam_direction(g1, state, 1, lr=0.1, eps=eps, epsilon_hat=True)
    hat, _ = backend.call(
        lambda g, s: core.adam_direction(g, s, 2, lr=0.1, eps=eps, epsilon_hat=True), g2, state
    )
    m = 0.9 * state.exp_avg + 0.1 * g2
    v = beta2 * state.exp_avg_sq + (1 - beta2) * g2 * g2
    backend.close(hat, 0.1 * np.sqrt(1 - beta2**2) / (1 - 0.9**2) * m / (np.sqrt(v) + eps))
    scaled = eps / math.sqrt(1 - beta2**2)
    plain, _ = backend.call(lambda g, s: core.adam_direction(g, s, 2, lr=0.1, eps=scaled), g2, state)
    backend.close(hat, plain)


def test_adam_decoupled_decay_term(backend):
    theta = np.array([2.0, -4.0])
    g = np.array([1.0, 1.0])
    state = core.adam_init(g)
    plain, _ = backend.call(lambda g, s: core.adam_direction(g, s, 1, lr=0.1), g, state)
    decayed, _ = backend.call(
        lambda g, s, p: core.adam_direction(g, s, 1, lr=0.1, weight_decay=0.5, param=p), g, state, theta
    )
    backend.close(decayed - plain, 0.1 * 0.5 * theta)


def test_amsgrad_keeps_the_max(backend):
    state = core.adam_init(np.zeros(2), amsgrad=True)
    g1, g2 = np.array([3.0, 0.1]), np.array([0.1, 3.0])

    def two_steps(g1, g2, s):
        _, s = core.adam_direction(g1, s, 1, lr=0.1, amsgrad=True)
        return core.adam_direction(g2, s, 2, lr=0.1, amsgrad=True)

    d, s = backend.call(two_steps, g1, g2, state)
    v1 = 0.001 * g1**2
    v2 = 0.999 * v1 + 0.001 * g2**2
    backend.close(s.exp_avg_sq, v2)
    backend.close(s.max_exp_avg_sq, np.maximum(v1, v2))
    m = 0.9 * 0.1 * g1 + 0.1 * g2
    expected = (0.1 / (1 - 0.9**2)) * m / (np.sqrt(np.maximum(v1, v2)) / math.sqrt(1 - 0.999**2) + 1e-8)
    backend.close(d, expected)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_buffer_starts_at_the_first_gradient(backend, nesterov):
    theta = np.array([1.0, -1.0])
    g1, g2 = np.array([0.5, 2.0]), np.array([-1.0, 1.0])
    hp = dict(lr=0.1, momentum=0.9, dampening=0.25, weight_decay=0.01, nesterov=nesterov)

    def two_steps(theta, g1, g2):
        d1, s = core.sgd_direction(g1, theta, core.sgd_init(theta), 1, **hp)
        d2, s = core.sgd_direction(g2, theta - d1, s, 2, **hp)
        return d1, d2, s

    d1, d2, s = backend.call(two_steps, theta, g1, g2)
    u1 = g1 + 0.01 * theta
    b1 = u1  # no dampening on the first step
    backend.close(d1, 0.1 * (u1 + 0.9 * b1 if nesterov else b1))
    u2 = g2 + 0.01 * (theta - d1)
    b2 = 0.9 * b1 + 0.75 * u2
    backend.close(s.momentum_buffer, b2)
    backend.close(d2, 0.1 * (u2 + 0.9 * b2 if nesterov else b2))


def test_sgd_without_momentum_is_plain(backend):
    theta, g = np.array([1.0, 2.0]), np.array([0.5, -0.5])
    d, s = backend.call(
        lambda t, g: core.sgd_direction(g, t, core.sgd_init(t), 3, lr=0.2, weight_decay=0.1), theta, g
    )
    backend.close(d, 0.2 * (g + 0.1 * theta))
    backend.close(s.momentum_buffer, np.zeros(2))


# --- §4 FTP ---------------------------------------------------------------------------------------


def test_ftp_first_step_sets_the_floor_radius(backend):
    theta0 = np.array([[1.0, 2.0], [3.0, 4.0]])
    direction = np.array([[0.5, -0.5], [0.1, 0.0]])
    grad = np.ones_like(theta0)
    state = ftp_state(theta0, radius=5.0, m=1.0, v=1.0)  # whatever it held: step 1 resets it
    new, s = backend.call(
        lambda p, d, g, s: core.ftp_project(p, d, p, g, s, 1), theta0, direction, grad, state
    )
    assert float(s.radius) == pytest.approx(1e-8, rel=1e-6)
    assert float(s.radius_exp_avg) == 0.0 and float(s.radius_exp_avg_sq) == 0.0
    # θ lands within 1e-8 of θ₀ row by row (that is the method, not a bug)
    assert np.all(np.abs(new - theta0).sum(axis=1) <= 1e-8 * (1 + 1e-5))
    backend.close(s.prev_displacement, -direction)
    backend.close(s.prev_inv_norm[:, 0], 1 / (np.abs(direction).sum(axis=1) + 1e-8))


def test_first_radius_update_divides_by_one_minus_beta1_squared(backend):
    # c_prev · g summed row by row, times s_prev: ∇γ = 1·(−2)·0.5 + 0 = −1 (negative: γ grows)
    theta = np.array([[0.0, 0.0]])
    prev = np.array([[1.0, 0.0]])
    grad = np.array([[-2.0, 7.0]])
    state = ftp_state(theta, radius=0.05, prev_displacement=prev, prev_inv_norm=np.array([[0.5]]))
    direction = np.array([[-3.0, 4.0]])  # c = (3, −4), n = 7 + 1e-8: γ stays far below max n
    new, s = backend.call(
        lambda p, d, g, s: core.ftp_project(p, d, p, g, s, 2), theta, direction, grad, state
    )
    g = -1.0
    m, v = 0.1 * g, 0.001 * g * g
    expected = 0.05 - 0.01 * (m / (1 - 0.9**2)) / (math.sqrt(v / (1 - 0.999**2)) + 1e-8)
    assert float(s.radius) == pytest.approx(expected, rel=backend.rtol)
    wrong = 0.05 - 0.01 * (m / (1 - 0.9)) / (math.sqrt(v / (1 - 0.999)) + 1e-8)
    assert abs(float(s.radius) - wrong) > 1e-3  # the bias correction uses t = 2, not t = 1
    backend.close(s.radius_exp_avg, m)
    backend.close(s.radius_exp_avg_sq, v)
    backend.close(new, np.array([[3.0, -4.0]]) * float(s.radius) / (7.0 + 1e-8))


@pytest.mark.parametrize("k", [0.0, 0.3, 1.0])
def test_k_scales_only_positive_radius_gradients(backend, k):
    prev = np.array([[1.0, 2.0], [0.0, 1.0]])
    inv = np.array([[0.5], [1.0]])
    up, down = np.array([[1.0, 1.0], [0.0, 1.0]]), -np.array([[1.0, 1.0], [0.0, 1.0]])
    gp, gn = backend.call(
        lambda a, b, c, i: (core.radius_gradient(a, c, i, k=k), core.radius_gradient(b, c, i, k=k)),
        up,
        down,
        prev,
        inv,
    )
    raw = 3.0 * 0.5 + 1.0 * 1.0
    backend.close(gp, k * raw, atol=1e-300)
    backend.close(gn, -raw)


def test_radius_is_clipped_to_the_largest_row_norm(backend):
    theta = np.zeros((2, 2))
    state = ftp_state(theta, radius=100.0)
    direction = np.array([[-1.0, 0.0], [-0.5, -0.5]])  # n = 1 + 1e-8 for both rows
    new, s = backend.call(lambda p, d, s: core.ftp_project(p, d, p, p * 0, s, 5), theta, direction, state)
    assert float(s.radius) == pytest.approx(1.0 + 1e-8, rel=backend.rtol)
    backend.close(new, -direction)


def test_ftp_zero_anchor_is_an_anchor_of_zeros(backend):
    theta = np.array([[1.0, -2.0], [0.5, 3.0]])
    direction = np.array([[0.1, 0.2], [-0.3, 0.4]])
    grad = np.array([[1.0, 0.0], [0.0, -1.0]])
    state = ftp_state(
        theta, radius=1.5, m=0.1, v=0.2, prev_displacement=theta, prev_inv_norm=np.array([[0.3], [0.2]])
    )
    zero, explicit = backend.call(
        lambda p, d, g, s: (
            core.ftp_project(p, d, None, g, s, 3, k=0.5),
            core.ftp_project(p, d, p * 0, g, s, 3, k=0.5),
        ),
        theta,
        direction,
        grad,
        state,
    )
    backend.close(zero[0], explicit[0])
    backend.close(zero[1].radius, explicit[1].radius)


@PROPERTY
@given(theta=tensors(min_dims=1), data=st.data())
def test_ftp_with_a_huge_radius_is_the_base_step(backend, theta, data):
    direction = data.draw(arrays(np.float64, theta.shape, elements=st.floats(-1, 1)))
    grad = data.draw(arrays(np.float64, theta.shape, elements=st.floats(-1, 1)))
    anchor = theta + data.draw(arrays(np.float64, theta.shape, elements=st.floats(-1, 1)))
    state = ftp_state(theta, radius=1e30)
    new, _ = backend.call(
        lambda p, d, a, g, s: core.ftp_project(p, d, a, g, s, 4), theta, direction, anchor, grad, state
    )
    backend.close(new, theta - direction, atol=1e-5 if backend.dtype == np.float32 else 1e-12)


# --- §5 SPD ---------------------------------------------------------------------------------------


def test_spd_zero_over_zero_gives_no_decay(backend):
    r0, r1 = backend.call(
        lambda a, b: (core.decay_ratio(a, a), core.decay_ratio(a, b)), np.array(0.0), np.array(2.0)
    )
    assert float(r0) == 0.0 and float(r1) == 0.0
    anchor = np.array([1.0, 2.0])
    # the base step lands exactly on the anchor: a = 0, nothing to decay, nothing NaN
    out = backend.call(
        lambda p, a, g: core.spd_step(p, p - a, a, g, 1.0), anchor + 1.0, anchor, np.array([1.0, 1.0])
    )
    backend.close(out, anchor)


def test_spd_decays_only_when_the_gradient_pushes_away(backend):
    anchor = np.array([0.0, 0.0])
    theta = np.array([3.0, 0.0])
    direction = np.array([-1.0, 0.0])  # θ̃ = (4, 0): a = 4, b = 3, r = 1/4
    away = np.array([1.0, 0.0])  # ⟨g, θ − θ₀⟩ = 3 > 0, so c = −3 < 0: decay
    toward = np.array([-1.0, 0.0])  # c = 3 > 0: no decay
    decayed, kept = backend.call(
        lambda p, d, a, g1, g2: (core.spd_step(p, d, a, g1, 0.8), core.spd_step(p, d, a, g2, 0.8)),
        theta,
        direction,
        anchor,
        away,
        toward,
    )
    backend.close(decayed, [4.0 - 0.8 * 0.25 * 4.0, 0.0])
    backend.close(kept, [4.0, 0.0])


def test_spd_ratio_is_clipped_when_the_step_moves_closer(backend):
    anchor, theta = np.zeros(2), np.array([3.0, 0.0])
    direction = np.array([1.0, 0.0])  # θ̃ = (2, 0): a < b, r = clip(−1/2) = 0
    out = backend.call(
        lambda p, d, a, g: core.spd_step(p, d, a, g, 1.0), theta, direction, anchor, np.ones(2)
    )
    backend.close(out, [2.0, 0.0])


def test_spd_zero_anchor(backend):
    theta, direction, grad = np.array([2.0, 0.0]), np.array([-2.0, 0.0]), np.array([1.0, 0.0])
    zero, explicit = backend.call(
        lambda p, d, g: (core.spd_step(p, d, None, g, 0.5), core.spd_step(p, d, p * 0, g, 0.5)),
        theta,
        direction,
        grad,
    )
    backend.close(zero, explicit)
    backend.close(zero, [4.0 - 0.5 * 0.5 * 4.0, 0.0])  # a = 4, b = 2, r = 1/2


@PROPERTY
@given(theta=tensors(min_dims=0), data=st.data(), decay=st.floats(0.0, 2.0))
def test_spd_properties(backend, theta, data, decay):
    shape = theta.shape
    direction = data.draw(arrays(np.float64, shape, elements=st.floats(-1, 1)))
    grad = data.draw(arrays(np.float64, shape, elements=st.floats(-1, 1)))
    anchor = theta + data.draw(arrays(np.float64, shape, elements=st.floats(-1, 1)))
    plain, decayed = backend.call(
        lambda p, d, a, g: (core.spd_step(p, d, a, g, 0.0), core.spd_step(p, d, a, g, decay)),
        theta,
        direction,
        anchor,
        grad,
    )
    tol = 1e-5 if backend.dtype == np.float32 else 1e-12
    backend.close(plain, theta - direction, atol=tol)  # λ = 0 is the base step
    # never farther from θ₀ than the unconstrained step
    assert np.linalg.norm(decayed - anchor) <= np.linalg.norm(plain - anchor) * (1 + tol) + tol


def test_spd_statistics_then_decay_equals_the_fused_step(backend):
    theta, anchor = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[0.5, 2.5], [2.0, 3.0]])
    direction, grad = np.array([[-0.5, 0.1], [0.2, -0.3]]), np.array([[1.0, -1.0], [0.5, 0.5]])

    def both(p, d, a, g):
        stats = core.spd_statistics(p, a, g)
        return core.spd_decay(p - d, a, stats, 0.7), core.spd_step(p, d, a, g, 0.7), stats

    wrapped, fused, stats = backend.call(both, theta, direction, anchor, grad)
    backend.close(wrapped, fused)
    backend.close(stats.alignment, np.sum(grad * (theta - anchor)))
    backend.close(stats.distance, np.linalg.norm(theta - anchor))


def test_decay_toward_anchor(backend):
    """θ ← (1 − s) θ̃ + s θ₀, the same point as θ̃ − s (θ̃ − θ₀); a zero anchor scales θ̃ by 1 − s."""
    new, anchor = np.array([[1.0, -2.0], [3.0, 0.5]]), np.array([[0.5, 2.5], [2.0, -3.0]])

    def both(n, a):
        return core.decay_toward_anchor(n, a, 0.3), core.decay_toward_anchor(n, None, 0.3)

    anchored, zero = backend.call(both, new, anchor)
    backend.close(anchored, new - 0.3 * (new - anchor))
    backend.close(zero, 0.7 * new)


# --- a whole step, composed as the adapters compose it ----------------------------------------


@pytest.mark.parametrize("kind", ["adam_ftp", "sgd_ftp", "adam_spd"])
def test_three_composed_steps_match_float64_numpy(backend, kind):
    rng = np.random.default_rng(0)
    theta0 = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(3)]

    def run(theta0, g1, g2, g3):
        theta, base = (
            theta0,
            (core.sgd_init(theta0) if kind == "sgd_ftp" else core.adam_init(theta0, amsgrad=True)),
        )
        ftp = core.ftp_init(theta0)
        for t, g in enumerate((g1, g2, g3), start=1):
            if kind == "sgd_ftp":
                d, base = core.sgd_direction(
                    g, theta, base, t, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
                )
            else:
                wd = 0.01 if kind == "adam_ftp" else 0.0
                d, base = core.adam_direction(g, base, t, lr=0.1, amsgrad=True, weight_decay=wd, param=theta)
            if kind == "adam_spd":
                theta = core.spd_step(theta, d, theta0, g, 0.5)
            else:
                theta, ftp = core.ftp_project(theta, d, theta0, g, ftp, t, k=0.5)
        return theta

    expected = run(theta0, *grads)  # plain NumPy float64
    backend.close(
        backend.call(run, theta0, *grads), expected, rtol=1e-12 if backend.dtype == np.float64 else 1e-4
    )


def test_state_dtypes_follow_the_parameter(backend):
    param = np.ones((2, 3))
    adam, ftp = backend.call(lambda p: (core.adam_init(p, amsgrad=True), core.ftp_init(p)), param)
    assert adam.exp_avg.dtype == backend.dtype and adam.max_exp_avg_sq.shape == (2, 3)
    assert ftp.prev_displacement.dtype == backend.dtype and ftp.prev_inv_norm.shape == (2, 1)
    assert ftp.radius.shape == () and ftp.radius.dtype == np.result_type(backend.dtype, np.float32)


def test_scalar_rules_are_elementwise_on_stacked_tensors(backend):
    """Adapters stack per-tensor scalars into vectors and apply the core's scalar rules once."""
    radius_grads = np.array([2.0, -3.0, 0.0])
    alignment, distance = np.array([1.0, -1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    new_distance = np.array([2.0, 2.0, 0.0])

    def rules(g, a, d, n):
        return core.damp_radius_gradient(g, 0.5), core.decay_strength(core.SPDStatistics(a, d), n, 0.5)

    damped, strength = backend.call(rules, radius_grads, alignment, distance, new_distance)
    backend.close(damped, [1.0, -3.0, 0.0])
    # pushed away with r = 1/2; pulled toward (no decay); a = 0 (0/0: no decay)
    backend.close(strength, [0.25, 0.0, 0.0], atol=1e-300)
