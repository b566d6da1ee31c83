"""diagnostics(state, params): per-tensor numbers to log, against the core and by hand, in float64.

SPD's ratio and condition are records the step keeps in its state (`ratio`, `decayed`);
FTP's radius and TPGM's constraint are state already.
"""

import itertools
import json
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tether import core
from tether.adapters import jax as tj

#: Two anchored tensors ("a", "b") and a new head ("h") that is not.
THETA0 = {
    "a": np.array([[1.0, 2.0, -0.5], [0.5, -1.0, 0.25]]),
    "b": np.array([0.3, -0.2, 0.1, 0.4]),
    "h": np.array([1.0, -1.0]),
}
MASK = {"a": True, "b": True, "h": False}
KEY = {n: f"['{n}']" for n in THETA0}
FIRST_GRADS = {
    "a": np.array([[0.3, -0.1, 0.2], [-0.4, 0.5, 0.1]]),
    "b": np.array([0.2, 0.1, -0.3, 0.05]),
    "h": np.array([0.5, 0.5]),
}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "jax.md"


def _params():
    return {n: jnp.asarray(v) for n, v in THETA0.items()}


def _plain(numbers):
    """The result is plain Python: floats and bools, JSON-serializable; it is returned unchanged."""
    for entry in numbers.values():
        for name, value in entry.items():
            assert type(value) is (bool if name == "decayed" else float), (name, type(value))
    assert json.loads(json.dumps(numbers)) == numbers
    return numbers


def _steps(tx, grads_list, params=None):
    """Run `tx` (jitted) on fixed gradients; the parameters and state after each step."""
    params = _params() if params is None else params
    state = tx.init(params)
    history = [(params, state)]
    for grads in grads_list:
        updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
        history.append((params, state))
    return history


def _distance(theta, theta0):
    return float(np.linalg.norm(np.asarray(theta) - (0 if theta0 is None else theta0)))


def _second_grads(params):
    """Gradients with ⟨g, θ − θ₀⟩ > 0 for "a" (SPD decays it) and < 0 for "b" (it does not).

    "a"'s gradient is mostly orthogonal to its displacement, so that the base step still
    moves it away from the anchor (a ratio in (0, 1)).
    """
    moved = {n: np.asarray(params[n]) - THETA0[n] for n in ("a", "b")}
    orthogonal = np.array([[1.0, -1.0, 2.0], [-2.0, 1.0, 0.5]])
    orthogonal -= np.sum(orthogonal * moved["a"]) / np.sum(moved["a"] ** 2) * moved["a"]
    return {"a": 0.1 * moved["a"] + orthogonal, "b": -moved["b"], "h": np.array([0.1, -0.2])}


# --- SPD: the ratio and the condition of the last step ---


def test_adam_spd_reports_the_ratio_and_condition_that_the_core_computes_for_each_step():
    lr, weight_decay = 0.05, 0.8
    tx = tj.adam_spd(lr, weight_decay=weight_decay, mask=MASK)
    params = _params()
    moments = {n: core.adam_init(THETA0[n], xp=np) for n in ("a", "b")}
    state = tx.init(params)
    assert _plain(tj.diagnostics(state, params)) == {
        KEY["a"]: {"distance": 0.0, "ratio": 0.0, "decayed": False},
        KEY["b"]: {"distance": 0.0, "ratio": 0.0, "decayed": False},
        KEY["h"]: {},
    }
    fired_seen = set()
    for step in (1, 2):
        grads = FIRST_GRADS if step == 1 else _second_grads(params)
        expected = {}
        for n in ("a", "b"):  # the step of tether.core, on the parameters the run has
            theta, grad = np.asarray(params[n]), grads[n]
            direction, moments[n] = core.adam_direction(
                grad, moments[n], step, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, xp=np
            )
            statistics = core.spd_statistics(theta, THETA0[n], grad, xp=np)
            new_distance = core.l2_norm(theta - direction - THETA0[n], xp=np)
            expected[n] = (
                core.decay_ratio(new_distance, statistics.distance, xp=np),
                -statistics.alignment < 0,
            )
        updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
        got = _plain(tj.diagnostics(state, params))
        assert got[KEY["h"]] == {}
        for n, (ratio, fired) in expected.items():
            assert got[KEY[n]]["ratio"] == pytest.approx(float(ratio), rel=1e-12, abs=1e-15), (step, n)
            assert got[KEY[n]]["decayed"] is bool(fired), (step, n)
            assert got[KEY[n]]["distance"] == pytest.approx(_distance(params[n], THETA0[n]), rel=1e-12)
            fired_seen.add((step, n, bool(fired), 0 < ratio < 1))
    # θ = θ₀ on the first step: no condition; on the second it fires for "a" only, with 0 < r < 1
    assert fired_seen == {
        (1, "a", False, False), (1, "b", False, False), (2, "a", True, True), (2, "b", False, True)
    }  # fmt: skip


def test_spd_around_sgd_by_hand():
    """θ̃ = θ − lr·g: the ratio and the condition by hand, and the decay they imply."""
    lr, weight_decay = 0.1, 0.5
    tx = tj.spd(optax.sgd(lr), weight_decay=weight_decay, mask=MASK)
    (_, _), (params, state) = _steps(tx, [FIRST_GRADS])
    grads = _second_grads(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), state, params)
    new_params = optax.apply_updates(params, updates)
    got = _plain(tj.diagnostics(state, new_params))
    assert got[KEY["h"]] == {}
    for n, fires in (("a", True), ("b", False)):
        theta, proposed = np.asarray(params[n]), np.asarray(params[n]) - lr * grads[n]
        before, after = np.linalg.norm(theta - THETA0[n]), np.linalg.norm(proposed - THETA0[n])
        ratio = np.clip((after - before) / after, 0, 1)
        assert got[KEY[n]]["decayed"] is bool(np.sum(grads[n] * (theta - THETA0[n])) > 0) is fires
        assert got[KEY[n]]["ratio"] == pytest.approx(ratio, rel=1e-12)
        assert 0 < ratio < 1
        decay = weight_decay * ratio if fires else 0.0
        np.testing.assert_allclose(new_params[n], proposed - decay * (proposed - THETA0[n]), rtol=1e-12)
        assert got[KEY[n]]["distance"] == pytest.approx(_distance(new_params[n], THETA0[n]), rel=1e-12)


@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: tj.adam_spd(1e-2, weight_decay=0.5, **kw),
        lambda **kw: tj.spd(optax.adam(1e-2), weight_decay=0.5, **kw),
    ],
    ids=["adam_spd", "spd"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_spd_records_are_0d_per_anchored_tensor_and_keep_their_dtypes(build, dtype):
    params = {n: jnp.asarray(v, dtype) for n, v in THETA0.items()}
    tx = build(mask=MASK)
    state = tx.init(params)
    wide = jnp.float64 if dtype == jnp.float64 else jnp.float32
    for n in ("a", "b"):
        assert state.ratio[n].shape == () and state.ratio[n].dtype == wide and float(state.ratio[n]) == 0.0
        assert state.decayed[n].shape == () and state.decayed[n].dtype == jnp.bool_ and not state.decayed[n]
    assert isinstance(state.ratio["h"], optax.MaskedNode) and isinstance(state.decayed["h"], optax.MaskedNode)

    def step(carry, grads):  # lax.scan needs the state's dtypes to stay as init made them
        params, state = carry
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    grads = jax.tree.map(lambda g: jnp.stack([jnp.asarray(g, dtype)] * 2), FIRST_GRADS)
    (params, state), _ = jax.jit(lambda c, g: jax.lax.scan(step, c, g))((params, state), grads)
    assert float(state.ratio["a"]) > 0  # the second step moved "a" away from the anchor
    assert all(state.ratio[n].dtype == wide and state.decayed[n].dtype == jnp.bool_ for n in ("a", "b"))


def _old_state(state):
    """`state` as a version without SPD's records saved it: pickled from a class with the old fields."""
    fields = [f for f in type(state)._fields if f not in ("ratio", "decayed")]
    old = NamedTuple(type(state).__name__, [(f, object) for f in fields])
    old.__module__, old.__qualname__ = type(state).__module__, type(state).__qualname__
    real = getattr(tj, old.__name__)
    setattr(tj, old.__name__, old)  # pickle finds the class by module and name
    try:
        blob = pickle.dumps(old(*(getattr(state, f) for f in fields)))
    finally:
        setattr(tj, old.__name__, real)
    return pickle.loads(blob)


@pytest.mark.parametrize(
    "build",
    [lambda: tj.adam_spd(1e-2, weight_decay=0.5), lambda: tj.spd(optax.adam(1e-2), weight_decay=0.5)],
    ids=["adam_spd", "spd"],
)
def test_a_state_from_a_version_without_the_records_is_a_clear_error_that_says_how_to_add_them(build):
    tx, params = build(), _params()
    grads = jax.tree.map(jnp.asarray, FIRST_GRADS)
    (_, _), (params, state) = _steps(tx, [FIRST_GRADS])
    old = _old_state(state)
    assert type(old) is type(state) and old.ratio is None and old.decayed is None
    for update in (tx.update, jax.jit(tx.update)):
        with pytest.raises(ValueError, match=r"older version of tether.*state\._replace"):
            update(grads, old, params)
    with pytest.raises(ValueError, match="older version of tether"):
        tj.diagnostics(old, params)
    new = tx.init(params)  # the message's recipe: the step goes on as before
    resumed, _ = tx.update(grads, old._replace(ratio=new.ratio, decayed=new.decayed), params)
    expected, _ = tx.update(grads, state, params)
    jax.tree.map(np.testing.assert_array_equal, resumed, expected)


def test_a_record_of_the_wrong_dtype_names_the_tensor_and_field():
    tx, params = tj.adam_spd(1e-2, weight_decay=0.5), _params()
    state = tx.init(params)
    state = state._replace(decayed={**state.decayed, "b": jnp.zeros((), jnp.float32)})
    with pytest.raises(ValueError, match=r"state.decayed of \['b'\] has dtype float32, expected bool"):
        jax.jit(tx.update)(jax.tree.map(jnp.asarray, FIRST_GRADS), state, params)


# --- FTP: the radius ---


@pytest.mark.parametrize(
    "build",
    [
        lambda: tj.adam_ftp(1e-2, weight_decay=0.1, mask=MASK),
        lambda: tj.sgd_ftp(1e-2, momentum=0.9, mask=MASK),
        lambda: tj.ftp(optax.adam(1e-2), mask=MASK),
    ],
    ids=["adam_ftp", "sgd_ftp", "ftp"],
)
def test_ftp_reports_its_radius_and_the_distance(build):
    grads = [FIRST_GRADS, jax.tree.map(lambda g: -0.5 * g, FIRST_GRADS), FIRST_GRADS]
    for params, state in _steps(build(), grads):
        got = _plain(tj.diagnostics(state, params))
        assert got[KEY["h"]] == {}
        for n in ("a", "b"):
            assert got[KEY[n]] == {
                "distance": pytest.approx(_distance(params[n], THETA0[n]), rel=1e-12),
                "radius": float(state.projection.radius[n]),
            }
    assert got[KEY["a"]]["radius"] > 1e-8 and got[KEY["a"]]["distance"] > 0  # the radius has learned


# --- zero anchors, the baselines, TPGM ---


@pytest.mark.filterwarnings("ignore:.*anchor='zero' but these anchored tensors are not zero:UserWarning")
@pytest.mark.parametrize(
    "build, entries",
    [
        (lambda: tj.adam_spd(1e-2, weight_decay=0.5, anchor="zero", mask=MASK), {"ratio", "decayed"}),
        (lambda: tj.spd(optax.adam(1e-2), weight_decay=0.5, anchor="zero", mask=MASK), {"ratio", "decayed"}),
        (lambda: tj.sgd_ftp(1e-2, anchor="zero", mask=MASK), {"radius"}),
        (lambda: tj.adam_ftp(1e-2, anchor="zero", mask=MASK), {"radius"}),
    ],
    ids=["adam_spd", "spd", "sgd_ftp", "adam_ftp"],
)
def test_a_zero_anchor_gives_the_distance_from_the_origin(build, entries):
    for params, state in _steps(build(), [FIRST_GRADS, FIRST_GRADS]):
        got = _plain(tj.diagnostics(state, params))
        assert got[KEY["h"]] == {}
        for n in ("a", "b"):
            assert set(got[KEY[n]]) == {"distance", *entries}
            assert got[KEY[n]]["distance"] == pytest.approx(_distance(params[n], None), rel=1e-12)
            assert got[KEY[n]]["distance"] > 0


@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: optax.chain(tj.l2_sp(0.1, **kw), optax.adam(1e-2)),
        lambda **kw: tj.mars_sp(optax.adam(1e-2), radius=0.01, **kw),
    ],
    ids=["l2_sp", "mars_sp"],
)
def test_l2_sp_and_mars_sp_report_the_distance_and_nothing_for_a_zero_anchor(build):
    for params, state in _steps(build(mask=MASK), [FIRST_GRADS, FIRST_GRADS])[1:]:
        got = _plain(tj.diagnostics(state, params))
        assert got[KEY["h"]] == {}
        for n in ("a", "b"):
            assert got[KEY[n]] == {"distance": pytest.approx(_distance(params[n], THETA0[n]), rel=1e-12)}
            assert got[KEY[n]]["distance"] > 0
    params, state = _steps(build(anchor="zero"), [FIRST_GRADS])[-1]
    assert tj.diagnostics(state, params) == {KEY[n]: {} for n in THETA0}  # a zero anchor stores nothing


def _tpgm_loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["a"] + jnp.sum(params["b"]) + jnp.sum(params["h"]) - y) ** 2)


def test_tpgm_reports_its_constraint_and_merges_with_an_optimizers_state():
    rng = np.random.default_rng(0)
    batches = itertools.cycle([(rng.standard_normal((4, 2)), rng.standard_normal((4, 3))) for _ in range(2)])
    params = _params()
    tpgm = tj.tpgm_init(params, norm="l2", mask=MASK)
    assert _plain(tj.diagnostics(tpgm, params))[KEY["a"]] == {"distance": 0.0, "constraint": 0.0}
    tx = tj.adam_spd(1e-1, weight_decay=0.5, mask=MASK)
    (_, _), (_, _), (params, opt_state) = _steps(tx, [FIRST_GRADS, FIRST_GRADS])
    params, tpgm = tj.tpgm_step(_tpgm_loss, params, tpgm, batches, lr=1e-2, iters=2)
    got = _plain(tj.diagnostics(tpgm, params))
    assert got[KEY["h"]] == {}
    for n in ("a", "b"):
        assert got[KEY[n]] == {
            "distance": pytest.approx(_distance(params[n], THETA0[n]), rel=1e-12),
            "constraint": float(tpgm.constraint[n]),
        }
        assert got[KEY[n]]["constraint"] > 0
    both = _plain(tj.diagnostics((opt_state, tpgm), params))  # the same anchors: one distance
    spd_only = tj.diagnostics(opt_state, params)
    for n in ("a", "b"):
        assert both[KEY[n]] == {**spd_only[KEY[n]], **got[KEY[n]]}
        assert set(both[KEY[n]]) == {"distance", "ratio", "decayed", "constraint"}


# --- states inside optax's containers ---


def _fused():
    return tj.adam_ftp(1e-2, weight_decay=0.1, mask=MASK)


CONTAINERS = {
    "chain": lambda: optax.chain(optax.identity(), _fused()),
    "inject_hyperparams": lambda: optax.inject_hyperparams(tj.adam_ftp, static_args=("mask",))(
        learning_rate=1e-2, weight_decay=0.1, mask=MASK
    ),
    "masked": lambda: optax.masked(tj.adam_ftp(1e-2, weight_decay=0.1), MASK),
    "multi_transform": lambda: optax.multi_transform(
        {"ftp": tj.adam_ftp(1e-2, weight_decay=0.1), "adam": optax.adam(1e-2)},
        {"a": "ftp", "b": "ftp", "h": "adam"},
    ),
}


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_a_tether_state_is_found_inside_optax_containers(container):
    grads = [FIRST_GRADS, FIRST_GRADS]
    expected = tj.diagnostics(*_steps(_fused(), grads)[-1][::-1])
    params, state = _steps(CONTAINERS[container](), grads)[-1]
    got = _plain(tj.diagnostics(state, params))
    assert got.keys() == expected.keys() and got[KEY["h"]] == {}
    for n in ("a", "b"):
        assert got[KEY[n]] == pytest.approx(expected[KEY[n]], rel=1e-12)
        assert set(got[KEY[n]]) == {"distance", "radius"}


def test_several_states_are_merged_per_tensor():
    """L2-SP chained before SPD, both anchored at init: one distance; a wrapper's inner state is searched."""
    grads = [FIRST_GRADS, FIRST_GRADS]
    params, state = _steps(optax.chain(tj.l2_sp(0.1, mask=MASK), tj.adam_spd(1e-2, 0.5, mask=MASK)), grads)[
        -1
    ]
    got = _plain(tj.diagnostics(state, params))
    assert got[KEY["h"]] == {}
    for n in ("a", "b"):
        assert got[KEY[n]] == {
            "distance": pytest.approx(_distance(params[n], THETA0[n]), rel=1e-12),
            "ratio": float(state[1].ratio[n]),
            "decayed": bool(state[1].decayed[n]),
        }
    params, state = _steps(tj.ftp(tj.spd(optax.adam(1e-2), weight_decay=0.5), mask=MASK), grads)[-1]
    got = _plain(tj.diagnostics(state, params))
    for n in ("a", "b"):
        assert got[KEY[n]] == {
            "distance": pytest.approx(_distance(params[n], THETA0[n]), rel=1e-12),
            "radius": float(state.projection.radius[n]),
            "ratio": float(state.inner_state.ratio[n]),
            "decayed": bool(state.inner_state.decayed[n]),
        }


def test_two_states_that_anchor_a_tensor_differently_are_an_error():
    params = _params()
    state = optax.chain(tj.l2_sp(0.1), tj.adam_spd(1e-2, 0.5, anchor="zero")).init(params)
    with pytest.raises(
        ValueError, match=r"\['a'\] has distance 0.0 from l2_sp and .* from adam_spd: the two states disagree"
    ):
        tj.diagnostics(state, params)
    assert tj.diagnostics(state[1], params)[KEY["a"]]["distance"] == _distance(THETA0["a"], None)


def test_flax_nnx_optimizer_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    anchors = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, tj.adam_ftp(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(3):
        train_step(model, optimizer, jnp.ones((4, 3)))
    params = nnx.state(model, nnx.Param)
    got = _plain(tj.diagnostics(optimizer.opt_state, params))
    assert set(got) == {"['bias'].value", "['kernel'].value"}
    for path, theta0 in jax.tree_util.tree_flatten_with_path(anchors)[0]:
        theta = dict(jax.tree_util.tree_flatten_with_path(params)[0])[path]
        assert got[jax.tree_util.keystr(path)]["distance"] == pytest.approx(
            _distance(theta, theta0), rel=1e-6
        )
        assert got[jax.tree_util.keystr(path)]["radius"] > 0


# --- errors ---


def test_a_state_without_a_tether_state_is_a_type_error():
    params = _params()
    for state in (optax.adam(1e-2).init(params), (), None):
        with pytest.raises(TypeError, match="no tether state in"):
            tj.diagnostics(state, params)


def test_a_state_of_other_parameters_is_a_value_error_naming_the_tensor():
    state = tj.adam_spd(1e-2, 0.5).init(_params())
    with pytest.raises(
        ValueError, match=r"adam_spd state has an entry for \['b'\], but `params` has no such"
    ):
        tj.diagnostics(state, {"a": _params()["a"], "h": _params()["h"]})
    other = {**_params(), "a": jnp.zeros((3, 2))}
    with pytest.raises(ValueError, match=r"anchor of \['a'\] has shape \(2, 3\), the parameter \(3, 2\)"):
        tj.diagnostics(state, other)
    with pytest.raises(ValueError, match="`params` is required"):
        tj.diagnostics(state, None)


def test_inside_jit_is_a_type_error():
    tx = tj.adam_ftp(1e-2)
    params = _params()
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"outside jax\.jit"):
        jax.jit(tj.diagnostics)(state, params)


# --- the page's snippet ---


def _snippet(name):
    text = DOCS.read_text()
    match = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, f"docs/jax.md has no snippet {name!r}"
    return match[1]


def test_the_pages_logging_snippet_runs_and_logs_what_diagnostics_returns(tmp_path):
    import io

    rng = np.random.default_rng(1)
    params = {
        "backbone": {"kernel": jnp.asarray(rng.standard_normal((4, 3)))},
        "head": {"kernel": jnp.zeros((3, 2))},
    }
    data = [(rng.standard_normal((8, 4)), rng.standard_normal((8, 2))) for _ in range(21)]

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((jnp.tanh(x @ params["backbone"]["kernel"]) @ params["head"]["kernel"] - y) ** 2)

    log = io.StringIO()
    namespace = dict(
        jax=jax, optax=optax, params=params, mask={"backbone": True, "head": False}, loss_fn=loss_fn,
        data=data, log=log,
    )  # fmt: skip
    exec(_snippet("diagnostics"), namespace)
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [line["step"] for line in lines] == [0, 10, 20]
    last = lines[-1]
    assert last["['head']['kernel']"] == {}
    backbone = last["['backbone']['kernel']"]
    assert set(backbone) == {"distance", "ratio", "decayed"} and backbone["distance"] > 0
    expected = tj.diagnostics(namespace["opt_state"], namespace["params"])
    assert {k: v for k, v in last.items() if k != "step"} == expected
    assert namespace["decayed"] == int(backbone["decayed"])
