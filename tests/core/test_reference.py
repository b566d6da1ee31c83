"""The NumPy reference run, the closed-loop problem, and what the core imports."""

import subprocess
import sys

import numpy as np
import pytest

from tether import core
from tether.core.reference import DEFAULTS, ReferenceOptimizer, closed_loop_problem, run_reference


def test_core_imports_no_framework():
    code = (
        "import sys, tether.core, tether.core.reference; "
        "loaded = [m for m in ('torch', 'jax', 'tensorflow', 'keras', 'optax') if m in sys.modules]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_problem_is_made_from_its_seed():
    a, b = closed_loop_problem(3, steps=4), closed_loop_problem(3, steps=4)
    c = closed_loop_problem(4, steps=4)
    for name in a.theta0:
        np.testing.assert_array_equal(a.noise[name], b.noise[name])
        assert a.noise[name].shape == (4, *a.theta0[name].shape)
        assert np.all(a.curvature[name] > 0)
    assert not np.array_equal(a.theta0["fc.weight"], c.theta0["fc.weight"])


@pytest.mark.parametrize("kind", sorted(DEFAULTS))
def test_reference_converges_toward_the_targets_and_stays_tethered(kind):
    problem = closed_loop_problem(0, steps=40, noise_scale=0.0)
    hparams = {"lr": 0.05} if kind != "adam_spd" else {"lr": 0.05, "weight_decay": 0.5}
    anchors = {"head.weight": None}
    trajectory = run_reference(kind, problem, 40, anchors=anchors, **hparams)
    head = trajectory["head.weight"]
    target = problem.target["head.weight"]
    # the unanchored head is free: it approaches its target
    assert np.linalg.norm(head[-1] - target) < 0.5 * np.linalg.norm(problem.theta0["head.weight"] - target)
    for name, path in trajectory.items():
        assert path.shape == (40, *problem.theta0[name].shape)
        assert np.all(np.isfinite(path))


def test_ftp_keeps_the_anchored_rows_within_the_radius():
    problem = closed_loop_problem(1, steps=10)
    opt = ReferenceOptimizer("adam_ftp", problem.theta0, lr=0.05)
    for t in range(10):
        opt.step({n: problem.gradient(n, p, t) for n, p in opt.params.items()})
        for name, p in opt.params.items():
            rows = core.mars_norm(p - problem.theta0[name])
            # θ₀ + Π(c) − θ₀ rounds at about 1e-16·|θ| per element: an absolute slack for that
            assert np.all(rows <= opt.radius(name) * (1 + 1e-9) + 1e-13)


def test_reference_skips_a_tensor_without_a_gradient():
    problem = closed_loop_problem(2, steps=3)
    opt = ReferenceOptimizer("sgd_ftp", problem.theta0, lr=0.1, momentum=0.9)
    frozen = opt.params["fc.bias"].copy()
    grads = {n: problem.gradient(n, p, 0) for n, p in opt.params.items()}
    grads["fc.bias"] = None
    opt.step(grads)
    np.testing.assert_array_equal(opt.params["fc.bias"], frozen)
    assert opt.steps["fc.bias"] == 0 and opt.steps["fc.weight"] == 1


def test_reference_rejects_bad_arguments():
    params = {"w": np.ones(3)}
    with pytest.raises(ValueError, match="unknown optimizer"):
        ReferenceOptimizer("lion", params)
    with pytest.raises(TypeError, match="momentum"):
        ReferenceOptimizer("adam_spd", params, momentum=0.9)
    with pytest.raises(ValueError, match="anchor mode"):
        ReferenceOptimizer("adam_ftp", params, anchors={"w": "pre"})


def test_float32_reference_tracks_float64():
    p64 = closed_loop_problem(5, steps=20)
    p32 = closed_loop_problem(5, steps=20, dtype=np.float32)
    a = run_reference("adam_spd", p64, 20, lr=0.01, weight_decay=0.3)
    b = run_reference("adam_spd", p32, 20, lr=0.01, weight_decay=0.3)
    for name in a:
        assert b[name].dtype == np.float32
        np.testing.assert_allclose(b[name], a[name], atol=1e-4)


def test_a_full_step_compiles_with_inductor():
    """One real torch.compile(fullgraph=True) with the default backend (the module uses 'eager')."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    def step(param, grad, anchor, adam, ftp, t):
        d, adam = core.adam_direction(grad, adam, t, lr=1e-2, weight_decay=0.1, param=param, xp=xp)
        new, ftp = core.ftp_project(param, d, anchor, grad, ftp, t, k=0.5, xp=xp)
        return new, adam, ftp

    gen = torch.Generator().manual_seed(0)
    param = torch.randn(6, 5, generator=gen)
    anchor, grad = param + 0.1, torch.randn(6, 5, generator=gen)
    adam, ftp = core.adam_init(param, xp=xp), core.ftp_init(param, xp=xp)
    compiled = torch.compile(step, fullgraph=True)
    for t in (1, 2, 3):
        tt = torch.tensor(float(t))
        expected = step(param, grad, anchor, adam, ftp, tt)
        got = compiled(param, grad, anchor, adam, ftp, tt)
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[2].radius, expected[2].radius)
        param, adam, ftp = expected
