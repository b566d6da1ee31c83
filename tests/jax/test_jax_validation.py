"""Bad input fails early and says what is wrong: at construction, init or update (also under jit)."""

import jax
import jax.numpy as jnp
import optax
import pytest

from tether.adapters import jax as tj

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros((3,))}
GRADS = {"w": jnp.ones((3, 2)), "b": jnp.ones((3,))}


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
