"""FTP's rows are output units in every layout (`row_axis`): a flax kernel `(in, out)` or
`(kh, kw, in, out)` takes the numbers of the PyTorch-layout reference, transposed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tether.adapters import jax as tj
from tether.core.reference import ReferenceOptimizer, closed_loop_problem

STEPS = 12

# PyTorch layout → flax layout of the kernels (`(out, in, kh, kw)` → `(kh, kw, in, out)`, `(out, in)` →
# `(in, out)`); the rest, the embedding `(num, dim)` included, is laid out alike in both.
TO_FLAX = {"conv.weight": (2, 3, 1, 0), "fc.weight": (1, 0)}
FLAX_NAMES = {
    "conv.weight": ("Conv_0", "kernel"),
    "fc.weight": ("Dense_0", "kernel"),
    "fc.bias": ("Dense_0", "bias"),
    "head.weight": ("Embed_0", "embedding"),  # an embedding (num, dim): rows on axis 0 in both layouts
    "scale": ("Scale_0", "scale"),
}


def _to_flax(name, x):
    return np.transpose(x, TO_FLAX[name]) if name in TO_FLAX else x


def _to_torch(name, x):
    return np.transpose(x, np.argsort(TO_FLAX[name])) if name in TO_FLAX else x


def _nest(flat):
    tree = {}
    for name, value in flat.items():
        module, leaf = FLAX_NAMES[name]
        tree.setdefault(module, {})[leaf] = value
    return {"params": tree}


def _flat(tree):
    return {name: tree["params"][module][leaf] for name, (module, leaf) in FLAX_NAMES.items()}


@pytest.fixture(scope="module")
def problem():
    return closed_loop_problem(seed=13, steps=STEPS)


def _run_flax(tx, problem, steps=STEPS):
    """Drive `tx` on flax-layout parameters; the gradients are the problem's, transposed."""
    params = jax.tree.map(jnp.asarray, _nest({n: _to_flax(n, v) for n, v in problem.theta0.items()}))
    state = tx.init(params)
    update = jax.jit(tx.update)
    trajectory = []
    for t in range(steps):
        torch_layout = {n: _to_torch(n, np.asarray(p)) for n, p in _flat(params).items()}
        grads = {n: _to_flax(n, problem.gradient(n, p, t)) for n, p in torch_layout.items()}
        updates, state = update(jax.tree.map(jnp.asarray, _nest(grads)), state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append({n: _to_torch(n, np.asarray(p)) for n, p in _flat(params).items()})
    return trajectory, state


def _run_reference(kind, problem, steps=STEPS, **hparams):
    reference = ReferenceOptimizer(kind, problem.theta0, **hparams)
    trajectory = []
    for t in range(steps):
        grads = {n: problem.gradient(n, p, t) for n, p in reference.params.items()}
        trajectory.append({n: p.copy() for n, p in reference.step(grads).items()})
    return trajectory


def _assert_same(got, expected, tol):
    for t, (a, b) in enumerate(zip(got, expected, strict=True)):
        for n in b:
            np.testing.assert_allclose(a[n], b[n], rtol=tol, atol=tol, err_msg=f"{n} at step {t + 1}")


CASES = {
    "adam_ftp": (lambda: tj.adam_ftp(1e-2, weight_decay=0.1, k=0.5), "adam_ftp", dict(lr=1e-2, weight_decay=0.1, k=0.5), 1e-12),
    "sgd_ftp": (
        lambda: tj.sgd_ftp(2e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2),
        "sgd_ftp", dict(lr=2e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2), 1e-12,
    ),
    "ftp(adamw)": (
        lambda: tj.ftp(optax.adamw(1e-2, weight_decay=0.1)), "adam_ftp", dict(lr=1e-2, weight_decay=0.1), 1e-9
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_flax_layout_gives_the_pytorch_layout_reference_transposed(case, problem):
    """The default rule: `kernel` leaves have their rows on the last axis, the embedding on axis 0."""
    build, kind, hparams, tol = CASES[case]
    got, state = _run_flax(build(), problem)
    _assert_same(got, _run_reference(kind, problem, **hparams), tol)
    inv_norm = state.projection.prev_inv_norm["params"]
    assert inv_norm["Dense_0"]["kernel"].shape == (1, 8)  # (in, out) = (12, 8): one per output unit
    assert inv_norm["Conv_0"]["kernel"].shape == (1, 1, 1, 6)
    assert inv_norm["Embed_0"]["embedding"].shape == (4, 1)
    assert inv_norm["Dense_0"]["bias"].shape == (1,)


def test_rows_on_axis_0_for_a_flax_kernel_are_not_the_reference(problem):
    """The layout matters: forcing PyTorch's axis on flax kernels changes the trajectory."""
    got, _ = _run_flax(tj.adam_ftp(1e-2, row_axis=0), problem)
    with pytest.raises(AssertionError):
        _assert_same(got, _run_reference("adam_ftp", problem, lr=1e-2), 1e-6)


def _flax_axes(path, leaf):
    return -1 if leaf.ndim >= 2 and path[-2].key in ("Dense_0", "Conv_0") else 0


ROW_AXIS_FORMS = {
    "pytree-prefix": {
        "params": {"Conv_0": -1, "Dense_0": {"kernel": 1, "bias": 0}, "Embed_0": 0, "Scale_0": 0}
    },
    "callable": _flax_axes,
}


@pytest.mark.parametrize("form", list(ROW_AXIS_FORMS))
def test_row_axis_as_a_pytree_or_a_callable(form, problem):
    got, _ = _run_flax(tj.sgd_ftp(2e-2, momentum=0.9, row_axis=ROW_AXIS_FORMS[form]), problem)
    _assert_same(got, _run_reference("sgd_ftp", problem, lr=2e-2, momentum=0.9), 1e-12)


def test_row_axis_as_an_int_for_every_leaf():
    """`row_axis=-1` on plain `(in, out)` matrices (no `kernel` key) equals the reference on `(out, in)`."""
    problem = closed_loop_problem(seed=2, steps=STEPS, shapes={"a": (5, 3), "b": (4, 6), "v": (3,)})
    params = {n: jnp.asarray(v.T) for n, v in problem.theta0.items()}
    for axis in (-1, 1):
        tx = tj.ftp(optax.sgd(3e-2), row_axis=axis)
        state, p = tx.init(params), params
        reference = ReferenceOptimizer("sgd_ftp", problem.theta0, lr=3e-2)
        for t in range(STEPS):
            grads = {n: jnp.asarray(problem.gradient(n, np.asarray(x).T, t).T) for n, x in p.items()}
            updates, state = jax.jit(tx.update)(grads, state, p)
            p = optax.apply_updates(p, updates)
            expected = reference.step({n: problem.gradient(n, x, t) for n, x in reference.params.items()})
            for n in p:
                np.testing.assert_allclose(np.asarray(p[n]).T, expected[n], rtol=1e-12, atol=1e-12)


def test_default_rule_on_a_nested_param_dict():
    params = {
        "params": {
            "Dense_0": {"kernel": jnp.ones((3, 5)), "bias": jnp.ones((5,))},
            "Conv_0": {"kernel": jnp.ones((2, 2, 3, 4))},
            "Embed_0": {"embedding": jnp.ones((7, 3))},
            "LayerNorm_0": {"scale": jnp.ones((5,))},
            "w": jnp.ones((6, 2)),
            "temperature": jnp.ones(()),
        }
    }
    for tx in (tj.adam_ftp(1e-3), tj.sgd_ftp(1e-3), tj.ftp(optax.sgd(1e-3))):
        shapes = jax.tree.map(lambda x: x.shape, tx.init(params).projection.prev_inv_norm["params"])
        assert shapes == {
            "Dense_0": {"kernel": (1, 5), "bias": (1,)},
            "Conv_0": {"kernel": (1, 1, 1, 4)},
            "Embed_0": {"embedding": (7, 1)},
            "LayerNorm_0": {"scale": (1,)},
            "w": (6, 1),
            "temperature": (),
        }


def test_default_rule_sees_attribute_keys_and_a_trailing_value():
    """flax NNX's `nnx.State` paths end in `.value`; a `kernel` attribute counts as a `kernel` key."""
    from tether.adapters._jax_tree import default_row_axis

    key, attr = jax.tree_util.DictKey, jax.tree_util.GetAttrKey
    leaf = jnp.ones((3, 4))
    assert default_row_axis((key("lin"), key("kernel"), attr("value")), leaf) == -1
    assert default_row_axis((attr("lin"), attr("kernel")), leaf) == -1
    assert default_row_axis((key("lin"), key("kernel")), jnp.ones((4,))) == 0
    assert default_row_axis((key("emb"), key("embedding"), attr("value")), leaf) == 0
    assert default_row_axis((key("lin"), key("weight")), leaf) == 0
    assert default_row_axis((key("lora"), key("lora_a"), attr("value")), leaf) == -1
    assert default_row_axis((attr("lora"), attr("lora_b")), leaf) == -1


def test_nnx_lora_factors_have_their_rows_on_the_last_axis_by_default():
    """`nnx.LoRA` keeps `lora_a` as `(in, rank)` and `lora_b` as `(rank, out)`: outputs last, as a kernel."""
    nnx = pytest.importorskip("flax.nnx")
    layer = nnx.LoRALinear(6, 4, lora_rank=2, rngs=nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    shapes = jax.tree.map(lambda x: x.shape, tj.adam_ftp(1e-3).init(params).projection.prev_inv_norm)
    assert nnx.to_pure_dict(shapes) == {
        "kernel": (1, 4),
        "bias": (1,),
        "lora": {"lora_a": (1, 2), "lora_b": (1, 4)},
    }
    axes = nnx.to_pure_dict(tj.tpgm_init(params).row_axis)
    assert int(axes["lora"]["lora_a"]) == 1 and int(axes["lora"]["lora_b"]) == 1 and int(axes["kernel"]) == 1


def test_a_state_made_with_another_row_axis_fails_at_update():
    params = {"w": jnp.ones((3, 2))}
    state = tj.adam_ftp(1e-3).init(params)
    with pytest.raises(ValueError, match=r"state.projection.prev_inv_norm of \['w'\] has shape \(3, 1\)"):
        jax.jit(tj.adam_ftp(1e-3, row_axis=-1).update)(params, state, params)


@pytest.mark.parametrize(
    "row_axis, error, match",
    [
        (1.0, TypeError, "row_axis must be None"),
        (True, TypeError, "row_axis must be None"),
        ({"w": "last"}, TypeError, "row_axis must be None"),
        (jnp.asarray(-1), TypeError, "static_args"),
    ],
)
def test_row_axis_of_the_wrong_kind_fails_at_construction(row_axis, error, match):
    for build in (tj.adam_ftp, tj.sgd_ftp, lambda lr, **kw: tj.ftp(optax.sgd(lr), **kw)):
        with pytest.raises(error, match=match):
            build(1e-3, row_axis=row_axis)


def test_row_axis_that_does_not_fit_the_parameters_names_the_leaf():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones((3,))}
    with pytest.raises(ValueError, match=r"row_axis 2 of \['w'\] is out of range for its shape \(3, 2\)"):
        tj.adam_ftp(1e-3, row_axis=2).init(params)
    with pytest.raises(ValueError, match="row_axis must be None"):
        tj.sgd_ftp(1e-3, row_axis={"w": 0, "c": 0}).init(params)
    with pytest.raises(TypeError, match=r"the row axis of \['b'\] is 'x'"):
        tj.ftp(optax.sgd(1e-3), row_axis=lambda path, leaf: "x").init(params)


def test_row_axis_under_inject_hyperparams_is_a_static_arg():
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(tj.adam_ftp)(learning_rate=1e-3, row_axis=-1).init(params)
    tx = optax.inject_hyperparams(tj.adam_ftp, static_args=("row_axis",))(learning_rate=1e-3, row_axis=-1)
    state = tx.init(params)
    jax.jit(tx.update)(params, state, params)
    assert state.inner_state.projection.prev_inv_norm["w"].shape == (1, 2)


def test_flax_linen_model_trains_like_the_pytorch_layout_reference():
    """A real flax.linen model: its gradients drive both runs, FTP's rows are its output units."""
    nn = pytest.importorskip("flax.linen")

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), dtype=jnp.float64, param_dtype=jnp.float64)(x)
            return nn.Dense(3, dtype=jnp.float64, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))

    model = Model()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 2)))
    params = model.init(jax.random.key(0), x)
    y = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3)))

    def loss(p):
        return jnp.sum((model.apply(p, x) - y) ** 2)

    permutation = {"Conv_0": (3, 2, 0, 1), "Dense_0": (1, 0)}  # flax → PyTorch layout of each kernel

    def torch_layout(tree):
        return {
            f"{m}.{leaf}": np.transpose(np.asarray(v), permutation[m]) if leaf == "kernel" else np.asarray(v)
            for m, leaves in tree["params"].items()
            for leaf, v in leaves.items()
        }

    tx = tj.adam_ftp(1e-2, weight_decay=0.05)
    state = tx.init(params)
    reference = ReferenceOptimizer("adam_ftp", torch_layout(params), lr=1e-2, weight_decay=0.05)
    for _ in range(6):
        grads = jax.grad(loss)(params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
        expected = reference.step(torch_layout(grads))
        for name, value in torch_layout(params).items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_flax_nnx_optimizer_uses_the_output_units_of_kernels():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(10, 3, rngs=rngs)
            self.linear = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, tokens):
            return self.linear(self.embed(tokens))

    model = Model(nnx.Rngs(0))
    plain = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # the same numbers as a plain dict
    optimizer = nnx.Optimizer(model, tj.adam_ftp(1e-2), wrt=nnx.Param)
    tokens = jnp.arange(6) % 10

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.sum(m(tokens) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(3):
        train_step(model, optimizer)
    inv_norm = optimizer.opt_state.projection.prev_inv_norm
    assert inv_norm["linear"]["kernel"].shape == (1, 4)
    assert inv_norm["embed"]["embedding"].shape == (10, 1)

    def loss(p):
        h = p["embed"]["embedding"][tokens]
        return jnp.sum((h @ p["linear"]["kernel"] + p["linear"]["bias"]) ** 2)

    axes = {"embed": 0, "linear": {"kernel": -1, "bias": 0}}
    tx = tj.adam_ftp(1e-2, row_axis=axes)
    state = tx.init(plain)
    for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(plain), state, plain)
        plain = optax.apply_updates(plain, updates)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
