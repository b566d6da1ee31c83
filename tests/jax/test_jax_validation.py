"""Bad input fails early and says what is wrong: at construction, init or update (also under jit)."""

import jax
import jax.numpy as jnp
import optax
import pytest

from tether.adapters import jax as tj

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros((3,))}
GRADS = {"w": jnp.ones((3, 2)), "b": jnp.ones((3,))}
INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: tj.adam_ftp(-1e-3), ValueError, "learning_rate"),
        (lambda: tj.adam_ftp(1e-3, b1=1.0), ValueError, "b1"),
        (lambda: tj.adam_ftp(1e-3, b2=-0.1), ValueError, "b2"),
        (lambda: tj.adam_ftp(1e-3, eps=-1e-8), ValueError, "eps"),
        (lambda: tj.adam_ftp(1e-3, weight_decay=-0.1), ValueError, "weight_decay"),
        (lambda: tj.adam_ftp(1e-3, k=1.5), ValueError, "k must be a finite number in"),
        (lambda: tj.adam_ftp(1e-3, k=-0.1), ValueError, "k must be a finite number in"),
        (lambda: tj.adam_ftp(1e-3, k=float("nan")), ValueError, "k must be a finite number in"),
        (lambda: tj.adam_ftp(1e-3, amsgrad=1), TypeError, "amsgrad"),
        (lambda: tj.adam_ftp(1e-3, anchor="pretrained"), ValueError, "anchor must be one of"),
        (lambda: tj.adam_ftp(1e-3, anchor=None), ValueError, "use `mask`"),
        (lambda: tj.adam_ftp("1e-3"), TypeError, "learning_rate"),
        (lambda: tj.sgd_ftp(1e-3, momentum=-0.9), ValueError, "momentum"),
        (lambda: tj.sgd_ftp(1e-3, nesterov=True), ValueError, "nesterov"),
        (lambda: tj.sgd_ftp(1e-3, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov"),
        (lambda: tj.sgd_ftp(1e-3, weight_decay=-1.0), ValueError, "weight_decay"),
        (lambda: tj.adam_spd(1e-3, weight_decay=-1.0), ValueError, "weight_decay"),
        (lambda: tj.adam_spd(1e-3, b1=1.2), ValueError, "b1"),
        (lambda: tj.ftp(optax.adam(1e-3), k=2.0), ValueError, "k must be a finite number in"),
        (lambda: tj.ftp(lambda g: g), TypeError, "GradientTransformation"),
        (lambda: tj.spd(optax.adam(1e-3), weight_decay=-0.5), ValueError, "weight_decay"),
        (lambda: tj.spd(optax.adam(1e-3), weight_decay=0.5, anchor="origin"), ValueError, "anchor"),
        (lambda: tj.adam_ftp(INF), ValueError, "learning_rate must be a finite number"),
        (lambda: tj.adam_ftp(NAN), ValueError, "learning_rate must be a finite number"),
        (lambda: tj.adam_ftp(1e-3, weight_decay=INF), ValueError, "weight_decay must be a finite number"),
        (lambda: tj.adam_ftp(1e-3, weight_decay=NAN), ValueError, "weight_decay must be a finite number"),
        (lambda: tj.adam_ftp(1e-3, eps=INF), ValueError, "eps must be a finite number"),
        (lambda: tj.sgd_ftp(INF), ValueError, "learning_rate must be a finite number"),
        (lambda: tj.sgd_ftp(1e-3, momentum=INF), ValueError, "momentum must be a finite number"),
        (lambda: tj.sgd_ftp(1e-3, momentum=0.9, dampening=-5.0), ValueError, r"dampening .*\[0.0, 1.0\]"),
        (lambda: tj.sgd_ftp(1e-3, momentum=0.9, dampening=2.0), ValueError, r"dampening .*\[0.0, 1.0\]"),
        (lambda: tj.sgd_ftp(1e-3, weight_decay=INF), ValueError, "weight_decay must be a finite number"),
        (lambda: tj.adam_spd(INF), ValueError, "learning_rate must be a finite number"),
        (lambda: tj.adam_spd(1e-3, weight_decay=INF), ValueError, "weight_decay must be a finite number"),
        (lambda: tj.spd(optax.adam(1e-3), weight_decay=NAN), ValueError, "weight_decay must be a finite"),
    ],
)
def test_invalid_hyperparameters_fail_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_array_hyperparameters_and_schedules_are_accepted():
    tj.adam_ftp(jnp.asarray(1e-3), b1=jnp.asarray(0.9), k=jnp.asarray(0.5))
    tj.sgd_ftp(optax.constant_schedule(1e-2), momentum=jnp.asarray(0.0))


TRANSFORMS = {
    "adam_ftp": lambda **kw: tj.adam_ftp(1e-3, **kw),
    "sgd_ftp": lambda **kw: tj.sgd_ftp(1e-3, momentum=0.9, **kw),
    "adam_spd": lambda **kw: tj.adam_spd(1e-3, weight_decay=0.1, **kw),
    "ftp": lambda **kw: tj.ftp(optax.adam(1e-3), **kw),
    "spd": lambda **kw: tj.spd(optax.adam(1e-3), weight_decay=0.1, **kw),
}
NAMES = list(TRANSFORMS)


@pytest.mark.parametrize("name", NAMES)
def test_update_without_params_is_a_clear_error(name):
    tx = TRANSFORMS[name]()
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="`params` is required"):
        tx.update(GRADS, state)
    with pytest.raises(ValueError, match="`params` is required"):
        jax.jit(tx.update)(GRADS, state)


@pytest.mark.parametrize("name", NAMES)
def test_mask_whose_tree_does_not_match_fails_at_init(name):
    tx = TRANSFORMS[name](mask={"w": True, "c": False})
    with pytest.raises(ValueError, match="`mask` must be a pytree of bools"):
        tx.init(PARAMS)


@pytest.mark.parametrize("name", ["adam_ftp", "spd"])
def test_mask_leaves_must_be_bools(name):
    with pytest.raises(TypeError, match="mask leaves must be bools"):
        TRANSFORMS[name](mask={"w": True, "b": "no"}).init(PARAMS)
    with pytest.raises(TypeError, match="mask must be None"):
        TRANSFORMS[name](mask="w")


@pytest.mark.parametrize("name", NAMES)
def test_gradients_whose_tree_does_not_match_fail_at_update(name):
    tx = TRANSFORMS[name]()
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="gradients do not have the tree structure"):
        jax.jit(tx.update)({"w": GRADS["w"]}, state, PARAMS)
    with pytest.raises(ValueError, match="gradient of \\['w'\\] has shape"):
        tx.update({"w": jnp.ones((2, 3)), "b": GRADS["b"]}, state, PARAMS)


@pytest.mark.parametrize("name", NAMES)
def test_state_from_other_params_fails_at_update(name):
    tx = TRANSFORMS[name]()
    state = tx.init({"w": jnp.ones((3, 2))})
    with pytest.raises(ValueError, match="does not have the tree structure of the parameters"):
        jax.jit(tx.update)(GRADS, state, PARAMS)
    state = tx.init({"w": jnp.ones((2, 2)), "b": jnp.zeros((3,))})
    with pytest.raises(ValueError, match="shape"):
        tx.update(GRADS, state, PARAMS)


@pytest.mark.parametrize("name", ["adam_ftp", "sgd_ftp", "adam_spd"])
def test_state_made_with_another_mask_fails_at_update(name):
    state = TRANSFORMS[name](mask={"w": True, "b": False}).init(PARAMS)
    with pytest.raises(ValueError, match="another mask"):
        TRANSFORMS[name]().update(GRADS, state, PARAMS)


@pytest.mark.parametrize("name", ["adam_ftp", "adam_spd"])
def test_state_of_another_transformation_is_a_type_error(name):
    state = optax.adam(1e-3).init(PARAMS)
    with pytest.raises(TypeError, match="made by this transformation's init"):
        TRANSFORMS[name]().update(GRADS, state, PARAMS)


@pytest.mark.parametrize("name", NAMES)
def test_complex_gradients_and_parameters_are_type_errors(name):
    tx = TRANSFORMS[name]()
    state = tx.init(PARAMS)
    complex_grads = {"w": GRADS["w"].astype(jnp.complex64), "b": GRADS["b"]}
    with pytest.raises(TypeError, match="complex"):
        tx.update(complex_grads, state, PARAMS)
    with pytest.raises(TypeError, match="complex"):
        tx.init({"w": PARAMS["w"].astype(jnp.complex64)})


def test_integer_parameters_are_type_errors():
    with pytest.raises(TypeError, match="floating-point"):
        tj.adam_ftp(1e-3).init({"step": jnp.zeros((), jnp.int32)})


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_], ids=["int32", "bool"])
@pytest.mark.parametrize("name", NAMES)
def test_integer_and_bool_parameters_are_errors_that_name_the_leaf(name, dtype):
    params = {**PARAMS, "layer": {"step": jnp.zeros((2,), dtype)}}
    grads = {**GRADS, "layer": {"step": jnp.zeros((2,), dtype)}}
    match = r"parameter \['layer'\]\['step'\] has dtype " + jnp.dtype(dtype).name
    tx = TRANSFORMS[name]()
    with pytest.raises(TypeError, match=match):
        tx.init(params)
    with pytest.raises(TypeError, match=match):
        jax.jit(tx.update)(grads, tx.init(PARAMS), params)


def _spy(calls):
    """optax.adam that records when its init and update run (at trace time under jit)."""
    adam = optax.adam(1e-3)

    def init(params):
        calls.append("init")
        return adam.init(params)

    def update(updates, state, params=None):
        calls.append("update")
        return adam.update(updates, state, params)

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("wrap", [tj.ftp, lambda inner, **kw: tj.spd(inner, weight_decay=0.1, **kw)])
def test_wrappers_check_everything_before_the_inner_transformation_runs(wrap):
    calls = []
    with pytest.raises(ValueError, match="`mask` must be a pytree of bools"):
        wrap(_spy(calls), mask={"w": True}).init(PARAMS)
    assert calls == []
    tx = wrap(_spy(calls))
    state = tx.init(PARAMS)
    calls.clear()
    broken = state._replace(anchor={"w": jnp.ones((2, 3)), "b": PARAMS["b"]})
    with pytest.raises(ValueError, match=r"state.anchor of \['w'\] has shape \(2, 3\)"):
        jax.jit(tx.update)(GRADS, broken, PARAMS)
    with pytest.raises(ValueError, match=r"state\.anchor does not have the tree structure"):
        tx.update({"w": GRADS["w"]}, state, {"w": PARAMS["w"]})
    assert calls == []


# --- a state that does not fit: a ValueError that names the leaf and the field, also under jit ---

P32 = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
G32 = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.ones((3,), jnp.float32)}


def _set(tree, leaf, value):
    return {**tree, leaf: value}


def _projection(**fields):
    def change(state):
        return state._replace(
            projection=state.projection._replace(
                **{f: _set(getattr(state.projection, f), "w", v) for f, v in fields.items()}
            )
        )

    return change


F16 = {"w": jnp.ones((3, 2), jnp.float16), "b": jnp.zeros((3,), jnp.float16)}
BROKEN_STATES = {
    "radius-shape": (
        "adam_ftp", P32, _projection(radius=jnp.zeros((1,), jnp.float32)),
        r"state.projection.radius of \['w'\] has shape \(1,\), expected \(\)",
    ),
    "radius-16-bit": (
        "sgd_ftp", F16, _projection(radius=jnp.zeros((), jnp.float16)),
        r"state.projection.radius of \['w'\] has dtype float16, expected float32",
    ),
    "radius-moment-shape": (
        "ftp", P32, _projection(radius_exp_avg=jnp.zeros((3,), jnp.float32)),
        r"state.projection.radius_exp_avg of \['w'\] has shape \(3,\)",
    ),
    "radius-moment-dtype": (
        "adam_ftp", P32, _projection(radius_exp_avg_sq=jnp.zeros((), jnp.float16)),
        r"state.projection.radius_exp_avg_sq of \['w'\] has dtype float16",
    ),
    "prev-inv-norm-shape": (
        "adam_ftp", P32, _projection(prev_inv_norm=jnp.zeros((1, 2), jnp.float32)),
        r"state.projection.prev_inv_norm of \['w'\] has shape \(1, 2\), expected \(3, 1\)",
    ),
    "prev-inv-norm-16-bit": (
        "adam_ftp", F16, _projection(prev_inv_norm=jnp.zeros((3, 1), jnp.float16)),
        r"state.projection.prev_inv_norm of \['w'\] has dtype float16, expected float32",
    ),
    "prev-displacement-shape": (
        "ftp", P32, _projection(prev_displacement=jnp.zeros((2, 3), jnp.float32)),
        r"state.projection.prev_displacement of \['w'\] has shape \(2, 3\), expected \(3, 2\)",
    ),
    "prev-displacement-dtype": (
        "sgd_ftp", P32, _projection(prev_displacement=jnp.zeros((3, 2), jnp.float16)),
        r"state.projection.prev_displacement of \['w'\] has dtype float16, expected float32",
    ),
    "projection-partly-missing": (
        "adam_ftp", P32, _projection(radius=optax.MaskedNode()),
        r"state.projection of \['w'\] is partly missing \(radius\)",
    ),
    "count-shape": (
        "adam_spd", P32, lambda s: s._replace(count=jnp.zeros((1,), jnp.int32)),
        r"state.count has shape \(1,\), expected \(\)",
    ),
    "count-dtype": (
        "ftp", P32, lambda s: s._replace(count=jnp.zeros((), jnp.float32)),
        r"state.count has dtype float32, expected int32",
    ),
    "moment-shape": (
        "adam_spd", P32, lambda s: s._replace(exp_avg=_set(s.exp_avg, "w", jnp.zeros((3,), jnp.float32))),
        r"state.exp_avg of \['w'\] has shape \(3,\), expected \(3, 2\)",
    ),
    "moment-dtype": (
        "adam_ftp", P32, lambda s: s._replace(exp_avg_sq=_set(s.exp_avg_sq, "w", jnp.zeros((3, 2), jnp.float16))),
        r"state.exp_avg_sq of \['w'\] has dtype float16, expected float32",
    ),
    "momentum-buffer-shape": (
        "sgd_ftp", P32,
        lambda s: s._replace(momentum_buffer=_set(s.momentum_buffer, "w", jnp.zeros((2, 3), jnp.float32))),
        r"state.momentum_buffer of \['w'\] has shape \(2, 3\)",
    ),
    "anchor-dtype": (
        "spd", P32, lambda s: s._replace(anchor=_set(s.anchor, "w", jnp.zeros((3, 2), jnp.bfloat16))),
        r"state.anchor of \['w'\] has dtype bfloat16, expected float32",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN_STATES))
def test_a_state_that_does_not_fit_is_a_value_error_naming_leaf_and_field(case):
    name, params, change, match = BROKEN_STATES[case]
    tx = TRANSFORMS[name]()
    state = change(tx.init(params))
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match=match):
        jax.jit(tx.update)(grads, state, params)
    with pytest.raises(ValueError, match=match):
        tx.update(grads, state, params)


@pytest.mark.parametrize(
    "made_by, used_by",
    [
        ("adam_spd", "adam_ftp"),
        ("adam_ftp", "adam_spd"),
        ("sgd_ftp", "adam_ftp"),
        ("ftp", "spd"),
        ("spd", "ftp"),
    ],
)
def test_a_state_of_another_of_these_transformations_is_a_type_error(made_by, used_by):
    state = TRANSFORMS[made_by]().init(PARAMS)
    with pytest.raises(TypeError, match="made by this transformation's init"):
        jax.jit(TRANSFORMS[used_by]().update)(GRADS, state, PARAMS)


@pytest.mark.parametrize("build", [tj.ftp, lambda inner: tj.spd(inner, weight_decay=0.1)], ids=["ftp", "spd"])
def test_a_wrapper_state_around_another_inner_is_a_value_error(build):
    state = build(optax.adam(1e-3)).init(PARAMS)
    with pytest.raises(
        ValueError, match=r"state.inner_state does not have the structure of inner.init\(params\)"
    ):
        jax.jit(build(optax.sgd(1e-3, momentum=0.9)).update)(GRADS, state, PARAMS)
    other = build(optax.adam(1e-3)).init({"w": jnp.ones((2, 3)), "b": jnp.zeros((3,))})
    state = state._replace(inner_state=other.inner_state)
    with pytest.raises(ValueError, match=r"state.inner_state.*\['w'\] has shape \(2, 3\)"):
        jax.jit(build(optax.adam(1e-3)).update)(GRADS, state, PARAMS)
