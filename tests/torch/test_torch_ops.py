"""The adapter's multi-tensor kernels against tether.core, in float64 at 1e-12."""

import array_api_compat.torch as xp
import pytest
import torch

from tether import core
from tether.adapters import _torch_ops as ops

SHAPES = [(), (5,), (4, 6), (3, 2, 2, 2)]


def tensors(seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=gen) for s in SHAPES]


def close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


def test_row_sum_and_shapes():
    for x in tensors(0):
        expected = core.mars_norm(x, xp=xp)
        close(ops.row_sum(x.abs()), expected)
        assert ops.mars_shape(x) == tuple(expected.shape)


@pytest.mark.parametrize("k", [1.0, 0.3, 0.0])
def test_radius_gradients(k):
    grads, prev, inv = tensors(1), tensors(2), [core.mars_norm(x, xp=xp) for x in tensors(3)]
    expected = torch.stack(
        [core.radius_gradient(g, c, s, k=k, xp=xp) for g, c, s in zip(grads, prev, inv, strict=True)]
    )
    undamped = ops.radius_gradients_(grads, [c.clone() for c in prev], inv)
    close(core.damp_radius_gradient(undamped, k, xp=xp), expected)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("step", [1, 7])
def test_adam_update_equals_core_direction(amsgrad, step):
    params, grads = tensors(4), tensors(5)
    states = [core.adam_init(p, amsgrad=amsgrad, xp=xp) for p in params]
    states = [
        core.AdamState(
            s.exp_avg + 0.1, s.exp_avg_sq + 0.2, None if s.max_exp_avg_sq is None else s.exp_avg_sq + 0.3
        )
        for s in states
    ]
    hp = dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-3)
    expected = []
    for p, g, s in zip(params, grads, states, strict=True):
        d, new = core.adam_direction(g, s, step, amsgrad=amsgrad, xp=xp, **hp)
        expected.append((p - d, new))
    m = [s.exp_avg.clone() for s in states]
    v = [s.exp_avg_sq.clone() for s in states]
    vmax = [None if s.max_exp_avg_sq is None else s.max_exp_avg_sq.clone() for s in states]
    second = ops.adam_moments(grads, m, v, vmax, beta1=0.8, beta2=0.99, amsgrad=amsgrad)
    targets = [p.clone() for p in params]
    t = torch.full((len(params),), float(step), dtype=torch.float64)
    ops.adam_update_(targets, m, second, t, **hp)
    for x, mi, vi, (p_new, new) in zip(targets, m, v, expected, strict=True):
        close(x, p_new)
        close(mi, new.exp_avg)
        close(vi, new.exp_avg_sq)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize(
    ("momentum", "dampening", "weight_decay"), [(0.0, 0.0, 0.0), (0.9, 0.0, 0.01), (0.9, 0.4, 0.0)]
)
@pytest.mark.parametrize("step", [1, 4])
def test_sgd_updates_equal_core_direction(nesterov, momentum, dampening, weight_decay, step):
    if nesterov and (momentum == 0 or dampening != 0):
        pytest.skip("nesterov needs momentum and no dampening")
    params, grads = tensors(6), tensors(7)
    buffers = [torch.zeros_like(p) if step == 1 else b for p, b in zip(params, tensors(8), strict=True)]
    hp = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    expected = [
        core.sgd_direction(g, p, core.SGDState(b), step, lr=1.0, xp=xp, **hp)
        for g, p, b in zip(grads, params, buffers, strict=True)
    ]
    bufs = [b.clone() for b in buffers]
    t = torch.full((len(params),), float(step), dtype=torch.float64)
    updates = ops.sgd_updates(params, grads, bufs, t, **hp)
    for u, b, (d, new) in zip(updates, bufs, expected, strict=True):
        close(u, d)
        if momentum:
            close(b, new.momentum_buffer)


def test_ftp_finish_equals_core_projection():
    params, grads, anchors = tensors(9), tensors(10), tensors(11)
    anchors[1] = None  # a zero anchor
    step = 3
    states_core = [
        core.FTPState(
            torch.tensor(0.5, dtype=torch.float64),
            torch.tensor(0.01, dtype=torch.float64),
            torch.tensor(0.002, dtype=torch.float64),
            c,
            core.mars_norm(c, xp=xp),
        )
        for c in tensors(12)
    ]
    directions = tensors(13)
    expected = [
        core.ftp_project(p, d, a, g, s, step, k=0.7, xp=xp)
        for p, d, a, g, s in zip(params, directions, anchors, grads, states_core, strict=True)
    ]
    states = [
        {
            "radius": s.radius.clone(),
            "radius_exp_avg": s.radius_exp_avg.clone(),
            "radius_exp_avg_sq": s.radius_exp_avg_sq.clone(),
            "prev_displacement": s.prev_displacement.clone(),
            "prev_inv_norm": s.prev_inv_norm.clone(),
        }
        for s in states_core
    ]
    buffers = [s["prev_displacement"] for s in states]
    radius_grads = ops.radius_gradients_(grads, buffers, [s["prev_inv_norm"] for s in states])
    moved = [p - d for p, d in zip(params, directions, strict=True)]
    displacements = ops.displacements_into(buffers, moved, anchors)
    t = torch.full((len(params),), float(step), dtype=torch.float64)
    ops.ftp_finish(moved, anchors, displacements, radius_grads, t, states, k=0.7)
    for p, s, (p_new, new) in zip(moved, states, expected, strict=True):
        close(p, p_new)
        close(s["radius"], new.radius)
        close(s["radius_exp_avg"], new.radius_exp_avg)
        close(s["radius_exp_avg_sq"], new.radius_exp_avg_sq)
        close(s["prev_displacement"], new.prev_displacement)
        close(s["prev_inv_norm"], new.prev_inv_norm)


def test_spd_keep_equals_core_decay():
    params, grads, anchors, directions = tensors(14), tensors(15), tensors(16), tensors(17)
    grads[2] = -grads[2]
    stats = [core.spd_statistics(p, a, g, xp=xp) for p, a, g in zip(params, anchors, grads, strict=True)]
    new = [p - d for p, d in zip(params, directions, strict=True)]
    keep = ops.spd_keep(
        torch.stack([s.alignment for s in stats]),
        torch.stack([s.distance for s in stats]),
        ops.norms([n - a for n, a in zip(new, anchors, strict=True)]),
        0.7,
    )
    for n, a, s, kp in zip(new, anchors, stats, keep, strict=True):
        close(a + kp * (n - a), core.spd_decay(n, a, s, 0.7, xp=xp))
