"""The Keras optimizers' public surface: arguments, errors, exclusions, config and serialization."""

import keras
import numpy as np
import pytest

from tether.adapters import keras as tk

OPTIMIZERS = [tk.AdamFTP, tk.SGDFTP, tk.AdamSPD]


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (tk.AdamFTP, dict(beta_1=1.0), "beta_1"),
        (tk.AdamFTP, dict(beta_2=-0.1), "beta_2"),
        (tk.AdamFTP, dict(epsilon=-1e-8), "epsilon"),
        (tk.AdamFTP, dict(weight_decay=-0.1), "weight_decay"),
        (tk.AdamFTP, dict(k=1.5), "k"),
        (tk.AdamFTP, dict(k="1"), "k"),
        (tk.AdamFTP, dict(amsgrad=1), "amsgrad"),
        (tk.SGDFTP, dict(momentum=-0.9), "momentum"),
        (tk.SGDFTP, dict(dampening=2.0), "dampening"),
        (tk.SGDFTP, dict(nesterov=True), "Nesterov"),
        (tk.SGDFTP, dict(momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
        (tk.SGDFTP, dict(k=-0.1), "k"),
        (tk.AdamSPD, dict(weight_decay=-1.0), "weight_decay"),
        (tk.AdamSPD, dict(beta_1=float("nan")), "beta_1"),
        (tk.AdamSPD, dict(anchor="pretrained"), "anchor"),
        (tk.AdamFTP, dict(anchor=None), "anchor"),
        (tk.SGDFTP, dict(anchor="Init"), "anchor"),
        (tk.AdamSPD, dict(learning_rate="fast"), "learning_rate"),
        (tk.AdamSPD, dict(learning_rate=-1.0), "learning_rate"),
        (tk.AdamSPD, dict(learning_rate=float("nan")), "learning_rate"),
        (tk.AdamFTP, dict(learning_rate=float("inf")), "learning_rate"),
        (tk.SGDFTP, dict(learning_rate=-1), "learning_rate"),
        (tk.SGDFTP, dict(learning_rate=np.float32(-0.5)), "learning_rate"),
        (tk.AdamFTP, dict(weight_decay=float("inf")), "weight_decay"),
        (tk.SGDFTP, dict(weight_decay=float("nan")), "weight_decay"),
        (tk.AdamSPD, dict(weight_decay=float("inf")), "weight_decay"),
        (tk.AdamFTP, dict(epsilon=float("inf")), "epsilon"),
        (tk.AdamSPD, dict(epsilon=float("nan")), "epsilon"),
        (tk.SGDFTP, dict(momentum=float("inf")), "momentum"),
        (tk.SGDFTP, dict(momentum=float("nan")), "momentum"),
        (tk.SGDFTP, dict(nesterov=1), "nesterov"),
    ],
)
def test_invalid_arguments_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_learning_rates_that_are_not_numbers_are_the_base_class_s(cls):
    """Schedules, callables and 0 are accepted (a schedule or callable cannot be checked up front)."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5)
    for learning_rate in (0.0, np.float64(0.1), schedule, lambda: 0.01):
        cls(learning_rate=learning_rate)


def test_defaults():
    adam = tk.AdamFTP()
    assert (adam.beta_1, adam.beta_2, adam.epsilon, adam.weight_decay, adam.amsgrad, adam.k, adam.anchor) == (
        0.9,
        0.999,
        1e-8,
        0.0,
        False,
        1.0,
        "init",
    )
    sgd = tk.SGDFTP()
    assert np.isclose(float(keras.ops.convert_to_numpy(sgd.learning_rate)), 0.01)
    assert (sgd.momentum, sgd.dampening, sgd.nesterov) == (0.0, 0.0, False)
    assert tk.AdamSPD().epsilon == 1e-8


def model(name="net"):
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="body"), keras.layers.Dense(2, name="head")], name=name
    )


def slot_names(optimizer):
    return {v.path.split("/", 1)[1] for v in optimizer.variables}


@pytest.mark.parametrize("how", ["var_list", "var_names"])
def test_exclude_from_anchor(how):
    net = model()
    optimizer = tk.AdamFTP()
    if how == "var_list":
        optimizer.exclude_from_anchor(var_list=net.get_layer("head").trainable_weights)
    else:
        optimizer.exclude_from_anchor(var_names=["head"])
    optimizer.build(net.trainable_variables)
    names = slot_names(optimizer)
    assert [optimizer.anchor_mode(v) for v in net.trainable_variables] == ["init", "init", None, None]
    assert {"net_body_kernel_anchor", "net_body_kernel_radius", "net_body_bias_prev_inv_norm"} <= names
    assert not any(
        n.startswith("net_head") and ("anchor" in n or "radius" in n or "prev" in n) for n in names
    )
    # every variable still has its moments and its step count
    assert {"net_head_kernel_momentum", "net_head_kernel_velocity", "net_head_kernel_step"} <= names


def test_no_unused_state():
    net = model()
    sgd = tk.SGDFTP(anchor="zero")
    with pytest.warns(UserWarning, match="not zero"):
        sgd.build(net.trainable_variables)
    names = slot_names(sgd)
    assert not any("momentum" in n or "anchor" in n for n in names)  # momentum 0, zero anchor: no buffers
    spd = tk.AdamSPD()
    spd.build(model("other").trainable_variables)
    assert not any("radius" in n or "prev" in n or "velocity_hat" in n for n in slot_names(spd))


def test_radius_state_shapes_and_dtypes():
    net = model()
    optimizer = tk.SGDFTP(momentum=0.9)
    optimizer.build(net.trainable_variables)
    kernel, bias = net.get_layer("body").kernel, net.get_layer("body").bias
    state = optimizer._ftp[optimizer._get_variable_index(kernel)]
    assert tuple(state.radius.shape) == () and state.radius.dtype == "float32"
    assert tuple(state.prev_inv_norm.shape) == (1, 3)  # a kernel's rows are its outputs, (in, out)
    assert tuple(optimizer._ftp[optimizer._get_variable_index(bias)].prev_inv_norm.shape) == (1,)


def test_exclude_after_build_raises():
    net = model()
    optimizer = tk.AdamSPD()
    optimizer.build(net.trainable_variables)
    with pytest.raises(ValueError, match="before the optimizer is built"):
        optimizer.exclude_from_anchor(var_names=["head"])


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_config_round_trip(cls):
    kwargs = dict(learning_rate=0.02, weight_decay=0.3, anchor="zero", clipnorm=1.0, name="opt")
    if cls is tk.SGDFTP:
        kwargs.update(momentum=0.9, nesterov=True, k=0.5)
    else:
        kwargs.update(beta_1=0.8, epsilon=1e-6, amsgrad=True)
    optimizer = cls(**kwargs)
    optimizer.exclude_from_anchor(var_names=["head"])
    config = optimizer.get_config()
    assert config["weight_decay"] == 0.3 and config["anchor"] == "zero"
    restored = cls.from_config(config)
    assert restored.get_config() == config
    assert restored.weight_decay == 0.3
    # through Keras's registry, by the registered name
    serialized = keras.optimizers.serialize(optimizer)
    assert serialized["registered_name"] == f"tether>{cls.__name__}"
    again = keras.optimizers.deserialize(serialized)
    assert type(again) is cls and again.get_config() == config


def test_a_name_is_one_name():
    """``var_names="head"`` is the name ``head``, not the letters h, e, a and d (``body`` has a d)."""
    net = model()
    optimizer = tk.AdamSPD()
    optimizer.exclude_from_anchor(var_names="head")
    optimizer.build(net.trainable_variables)
    assert [optimizer.anchor_mode(v) for v in net.trainable_variables] == ["init", "init", None, None]


def test_one_variable_is_a_list_of_one():
    net = model()
    optimizer = tk.AdamSPD()
    optimizer.exclude_from_anchor(var_list=net.get_layer("head").kernel)
    optimizer.build(net.trainable_variables)
    assert [optimizer.anchor_mode(v) for v in net.trainable_variables] == ["init", "init", None, "init"]


def test_exclusions_by_object_survive_config_before_build():
    """Before the build, the config records the excluded variables' paths; a rebuilt model matches them."""
    net = model()
    optimizer = tk.AdamFTP()
    optimizer.exclude_from_anchor(var_list=net.get_layer("head").trainable_weights)
    config = optimizer.get_config()
    assert config["anchor_exclusions"] == {
        "var_names": [],
        "var_paths": ["net/head/bias", "net/head/kernel"],
        "var_indices": [],
    }
    restored = tk.AdamFTP.from_config(config)
    assert restored.get_config() == config
    # load_model rebuilds a model without its name in front of the paths
    layers = [keras.layers.Dense(3, name="body"), keras.layers.Dense(2, name="head")]
    for layer, width in zip(layers, (4, 3)):
        layer.build((None, width))
    variables = [v for layer in layers for v in layer.trainable_weights]
    assert [v.path for v in variables] == ["body/kernel", "body/bias", "head/kernel", "head/bias"]
    restored.build(variables)
    assert [restored.anchor_mode(v) for v in variables] == ["init", "init", None, None]
    # another model's `head` is not a layer of this name
    other = keras.layers.Dense(2, name="not_head")
    other.build((None, 3))
    assert optimizer.anchor_mode(other.kernel) == "init"


def test_exclusions_survive_config_once_built():
    net = model()
    optimizer = tk.AdamFTP()
    optimizer.exclude_from_anchor(var_list=[net.get_layer("head").kernel], var_names=["body/bias"])
    assert optimizer.get_config()["anchor_exclusions"] == {
        "var_names": ["body/bias"],
        "var_paths": ["net/head/kernel"],
        "var_indices": [],
    }
    optimizer.build(net.trainable_variables)
    config = optimizer.get_config()
    assert config["anchor_exclusions"] == {"var_names": ["body/bias"], "var_paths": [], "var_indices": [1, 2]}
    restored = tk.AdamFTP.from_config(config)
    restored.build(model("copy").trainable_variables)
    assert [mode is None for mode in restored._modes] == [False, True, True, False]
    assert restored.get_config() == config


def test_base_weight_decay_never_acts():
    """weight_decay is the method's own; Keras's decoupled decay (θ ← θ − lr·wd·θ) must not also run."""
    variable = keras.Variable(np.ones(3, dtype="float32"))
    optimizer = tk.AdamSPD(learning_rate=0.1, weight_decay=0.5)
    optimizer.exclude_from_anchor(var_list=[variable])
    optimizer.apply_gradients([(keras.ops.zeros((3,)), variable)])
    # zero gradient, unanchored: Adam's direction is 0, and no decay of any kind
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), np.ones(3))


def test_the_keras_namespace_has_every_function_the_core_calls():
    """``tether.core`` lists the Array API subset it uses; TPGM's first call needs ``min``."""
    import re

    from tether import core
    from tether.adapters._keras_ops import keras_namespace

    listed = re.search(r"- functions: (.*?);\s*- the dtype", core.__doc__, re.S).group(1)
    names = [n for n in re.findall(r"`(\w+)`", listed) if n not in ("axis", "keepdims")]  # sum's arguments
    assert "min" in names
    assert [n for n in names if not hasattr(keras_namespace, n)] == []
    x = keras.ops.convert_to_tensor(np.array([[3.0, -1.0], [2.0, 5.0]]))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras_namespace.min(x)), -1.0)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(keras_namespace.min(x, axis=0, keepdims=True)), [[2.0, -1.0]]
    )
