"""Errors: non-finite values, the reject policy, bad parameters, bad gradients and bad options."""

from __future__ import annotations

import math

import pytest
import torch

from bayesflow.engine import (
    Block,
    GradientNotAvailable,
    Preconditioned,
    Scalar,
    SDEConfig,
    SemiImplicitEuler,
    Splitting,
    SquaredGradientAverage,
    build,
    hamiltonian_curl,
)
from bayesflow.tree import flatten

DTYPE = torch.float64


def log_posterior(params, batch):
    """-|θ|²/2 on {"a", "b"}; ``batch`` injects a fault: "nan-grad"/"inf-grad" into b's gradient, "nan-value"."""
    if batch in ("nan-grad", "inf-grad") and params["b"].requires_grad:
        bad = math.nan if batch == "nan-grad" else math.inf
        params["b"].register_hook(lambda g: torch.full_like(g, bad))
    value = -0.5 * (params["a"] ** 2).sum() - 0.5 * (params["b"] ** 2).sum()
    if batch == "nan-value":
        value = value + math.nan
    return value, None


def params():
    return {"a": torch.tensor([1.0, -1.0], dtype=DTYPE), "b": torch.tensor([0.5, 2.0], dtype=DTYPE)}


def momentum_config(integrator, **fields):
    return SDEConfig(step_size=0.1, diffusion=Block({("momenta", "momenta"): Scalar(1.0)}),
                     curl=hamiltonian_curl(1.0), integrator=integrator, **fields)


CONFIGS = {
    "SGLD": lambda **f: SDEConfig(step_size=0.1, **f),
    "SGHMC": lambda **f: momentum_config(SemiImplicitEuler(), **f),
    "BAOAB": lambda **f: momentum_config(Splitting("BAOAB"), **f),
    "pSGLD": lambda **f: SDEConfig(step_size=0.1, diffusion=Preconditioned(SquaredGradientAverage(0.9, 1e-3)), **f),
    "AdamW-like decay": lambda **f: SDEConfig(step_size=0.1, decoupled_weight_decay=0.1, **f),
}


def advance(transform, state, batches, inplace=False):
    for batch in batches:
        state, _ = transform.update(state, batch, inplace=inplace)
    return state


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize(("fault", "fragments"), [
    ("nan-grad", ["gradient", "not finite", "step 2", "leaf 'b'"]),
    ("inf-grad", ["gradient", "not finite", "step 2", "leaf 'b'"]),
    ("nan-value", ["log posterior", "nan", "step 2"]),
])
def test_nonfinite_values_raise_naming_step_and_leaf(name, fault, fragments):
    transform = build(log_posterior, CONFIGS[name]())
    state = advance(transform, transform.init(params(), seed=0), [None, None])
    with pytest.raises(FloatingPointError) as error:
        transform.update(state, fault)
    for fragment in fragments:
        assert fragment in str(error.value), f"{fragment!r} not in {error.value}"


def test_nonfinite_gradient_of_a_caller_is_caught_when_checks_are_full():
    transform = build(log_posterior, SDEConfig(step_size=0.1, check_finite="full"))
    state = transform.init(params(), seed=0)
    with pytest.raises(FloatingPointError, match="leaf 'a'"):
        transform.step(state, {"a": torch.tensor([math.nan, 0.0], dtype=DTYPE), "b": torch.zeros(2, dtype=DTYPE)})


@pytest.mark.parametrize("entry", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("path", ["norms", "concatenated", "concatenated, one value per chain"])
@pytest.mark.parametrize("where", ["gradient", "value"])
def test_finite_check_finds_every_kind_of_bad_entry_on_every_path(entry, path, where):
    """The sum of one concatenation (small models, value included, one or one per chain) and the
    per-leaf norms (large ones) catch NaN, +inf and -inf and name the culprit; huge finite
    gradients whose sum overflows are not reported."""
    from bayesflow.engine.validation import check_finite

    grads = [torch.ones(3, 2), torch.ones(4)]
    spec = flatten({"w": grads[0], "b": grads[1]})[1]
    per_chain = path == "concatenated, one value per chain"
    small = path != "norms"
    value = torch.zeros(2) if per_chain else torch.tensor(0.0)
    assert check_finite(value, grads, spec, 4, small) is None
    if where == "gradient":
        grads[1][2] = entry
    else:
        value = torch.tensor([0.0, entry]) if per_chain else torch.tensor(entry)
    message = check_finite(value, grads, spec, 4, small)
    assert message is not None and "step 4" in message
    # leaf order of a dict: b, w — grads[1] is "w"
    assert ("'w'" in message) if where == "gradient" else ("log posterior" in message)
    huge = [torch.full((3, 2), 3e38), torch.full((4,), 3e38)]
    assert check_finite(torch.tensor(0.0), huge, spec, 4, small) is None
    assert check_finite(torch.tensor(entry), None, spec, 4, small) is not None  # value-only mode
    assert check_finite(torch.tensor([0.0, 1.0]), None, spec, 4, small) is None


def test_checks_can_be_switched_off():
    transform = build(log_posterior, SDEConfig(step_size=0.1, check_finite="none"))
    state, _ = transform.update(transform.init(params(), seed=0), "nan-grad")
    assert torch.isnan(state.params["b"]).all() and torch.isfinite(state.params["a"]).all()
    transform = build(log_posterior, SDEConfig(step_size=0.1, check_finite="value"))
    state, _ = transform.update(transform.init(params(), seed=0), "nan-grad")
    assert torch.isnan(state.params["b"]).all()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("fault", ["nan-grad", "nan-value"])
def test_reject_policy_returns_the_input_state_and_continues(name, inplace, fault):
    transform = build(log_posterior, CONFIGS[name](temperature=0.5, on_nonfinite="reject"))
    state = advance(transform, transform.init(params(), seed=0), [None, None], inplace)
    before = [t.clone() for t in flatten((state.params, state.momenta, state.xi, state.preconditioner, state.rng))[0]]
    rejected, _ = transform.update(state, fault, inplace=inplace)
    after = flatten((rejected.params, rejected.momenta, rejected.xi, rejected.preconditioner, rejected.rng))[0]
    assert len(after) == len(before)
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    assert int(rejected.step) == 3 and int(rejected.rejected) == 1  # the refusal is recorded in the state
    resumed, _ = transform.update(rejected, None, inplace=inplace)
    assert all(torch.isfinite(t).all() for t in resumed.params.values())
    assert not torch.equal(resumed.params["a"], before[0])


# ----- parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bad", "error", "fragments"), [
    (torch.zeros(3, dtype=torch.int64), TypeError, ["dtype torch.int64", "floating point"]),
    ({"a": torch.zeros(2), "b": [1.0, 2.0]}, TypeError, ["leaf 1", "float", "torch.Tensor"]),
    ({"a": torch.zeros(2), "b": torch.zeros(2, device="meta")}, ValueError, ["several devices", "cpu", "meta"]),
    ({"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.float64)}, ValueError,
     ["several dtypes", "float32", "float64"]),
    ({}, ValueError, ["no tensors"]),
])
def test_bad_params_are_rejected_at_init(bad, error, fragments):
    transform = build(log_posterior, momentum_config(SemiImplicitEuler()))
    with pytest.raises(error) as raised:
        transform.init(bad, seed=0)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


@pytest.mark.parametrize(("source", "target"), [("SGLD", "SGHMC"), ("SGHMC", "SGLD"), ("SGLD", "pSGLD"),
                                                ("pSGLD", "SGLD")])
@pytest.mark.parametrize("fresh", [False, True])
def test_a_state_of_another_method_is_rejected_with_its_components(source, target, fresh):
    """A state made by another method's transform (other components or preconditioners) is named
    as such, also in a transform that never ran init — never advanced with parts missing or ignored."""
    state = build(log_posterior, CONFIGS[source]()).init(params(), seed=0)
    transform = build(log_posterior, CONFIGS[target]())
    if not fresh:
        transform.init(params(), seed=0)
    with pytest.raises(ValueError, match="another method's transform"):
        transform.update(state, None)


def test_bad_momenta_and_update_before_init_are_rejected():
    transform = build(log_posterior, momentum_config(SemiImplicitEuler()))
    with pytest.raises(TypeError, match="init"):
        transform.update(None, None)
    with pytest.raises(TypeError, match="init"):
        transform.step(params(), params())
    with pytest.raises(ValueError, match="structure and shapes of params"):
        transform.init(params(), momenta={"a": torch.zeros(2, dtype=DTYPE)})
    with pytest.raises(ValueError, match="structure and shapes of params"):
        transform.init(params(), momenta={"a": torch.zeros(2, dtype=DTYPE), "b": torch.zeros(3, dtype=DTYPE)})


# ----- gradients given to step ----------------------------------------------------------------------------
@pytest.mark.parametrize(("grads", "fragments"), [
    ({"a": torch.zeros(2, dtype=DTYPE)}, ["structure"]),
    ({"a": torch.zeros(2, dtype=DTYPE), "c": torch.zeros(2, dtype=DTYPE)}, ["structure"]),
    ([torch.zeros(2, dtype=DTYPE), torch.zeros(2, dtype=DTYPE)], ["structure"]),
    ({"a": torch.zeros(2, dtype=DTYPE), "b": torch.zeros(3, dtype=DTYPE)}, ["'b'", "shape (3,)", "(2,)"]),
    ({"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(2, dtype=DTYPE)}, ["'a'", "torch.float32"]),
])
@pytest.mark.parametrize("inplace", [False, True])
def test_step_rejects_gradients_that_do_not_match_params(grads, fragments, inplace):
    transform = build(log_posterior, SDEConfig(step_size=0.1))
    state = transform.init(params(), seed=0)
    before = {k: v.clone() for k, v in state.params.items()}
    with pytest.raises(ValueError) as raised:
        transform.step(state, grads, inplace=inplace)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"
    assert all(torch.equal(state.params[k], before[k]) for k in before)


@pytest.mark.parametrize("word", ["BAOAB", "OBABO", "ABOBA"])
def test_step_refuses_words_that_need_a_second_gradient_without_touching_the_state(word):
    transform = build(log_posterior, momentum_config(Splitting(word)))
    state = transform.init(params(), seed=0)
    before = [t.clone() for t in flatten((state.params, state.momenta, state.rng, state.step))[0]]
    grads = {"a": -state.params["a"], "b": -state.params["b"]}
    for _ in range(2):
        with pytest.raises(GradientNotAvailable, match="update"):
            transform.step(state, grads, inplace=True)
    for old, new in zip(before, flatten((state.params, state.momenta, state.rng, state.step))[0]):
        assert torch.equal(old, new)


# ----- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "error", "fragments"), [
    (dict(check_finite="sometimes"), ValueError, ["check_finite", "'sometimes'", "'full'"]),
    (dict(on_nonfinite="skip"), ValueError, ["on_nonfinite", "'skip'", "'reject'"]),
    (dict(momenta_init="random"), ValueError, ["momenta_init", "'random'", "'zero'"]),
    (dict(integrator="BAOAB"), TypeError, ["integrator", "str"]),
    (dict(weight_decay=-1.0), ValueError, ["non-negative"]),
    (dict(step_scales=(("velocity", lambda t: 1.0),)), ValueError, ["'velocity'"]),
])
def test_bad_options_are_rejected_by_the_config(fields, error, fragments):
    with pytest.raises(error) as raised:
        SDEConfig(step_size=0.1, **fields)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


@pytest.mark.parametrize(("fields", "fragments"), [
    (dict(temperature=-1.0), ["temperature", "non-negative"]),
    (dict(temperature=math.nan), ["temperature", "finite"]),
    (dict(step_size="0.1"), ["step_size", "str"]),
    (dict(temperature=torch.tensor([0.1, 0.2])), ["temperature has 2 values", "chains"]),
])
def test_bad_schedules_are_rejected_at_build(fields, fragments):
    with pytest.raises((ValueError, TypeError)) as raised:
        build(log_posterior, SDEConfig(**{"step_size": 0.1, **fields}))
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


@pytest.mark.parametrize(("num_data", "fragments"), [
    (0.0, ["num_data", "positive"]), ((1.0, 2.0, 3.0), ["3 entries", "2 leaves"]), ((1.0, -2.0), ["positive"]),
])
def test_bad_num_data_is_rejected_at_init(num_data, fragments):
    with pytest.raises(ValueError) as raised:
        build(log_posterior, SDEConfig(step_size=0.1, num_data=num_data)).init(params(), seed=0)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


@pytest.mark.parametrize(("word", "fragment"), [("BAXB", "only the letters"), ("BAB", "lacks 'O'"), ("", "only")])
def test_bad_splitting_words_are_rejected(word, fragment):
    with pytest.raises(ValueError, match=fragment):
        Splitting(word)


def test_splitting_without_momenta_is_rejected():
    with pytest.raises(ValueError, match="needs momenta"):
        # An explicit params-only curl with a splitting word and no momenta blocks.
        build(log_posterior, SDEConfig(step_size=0.1, integrator=Splitting("BAOAB"))).init(params())


BAD_RETURNS = [
    ("a bare value", lambda p: -(p["w"] ** 2).sum(), TypeError, ["must return (value, aux)", "got Tensor"]),
    ("a Python float", lambda p: (1.0, None), TypeError, ["floating-point tensor", "1.0"]),
    ("a vector", lambda p: (-(p["w"] ** 2), None), ValueError, ["must be a scalar", "got (3,)"]),
    ("a value without a graph", lambda p: (-(p["w"] ** 2).sum().detach(), None), ValueError,
     ["does not depend on the params", "torch.no_grad()"]),
]


@pytest.mark.parametrize(("what", "returns", "error", "fragments"), BAD_RETURNS, ids=[case[0] for case in BAD_RETURNS])
@pytest.mark.parametrize("route", ["single chain", "vmap over chains"])
def test_a_log_posterior_returning_the_wrong_thing_gets_a_message_saying_what(what, returns, error, fragments, route):
    """The (value, aux) contract is checked where the engine calls the log posterior, with the same
    message on the single-chain and the vmap route (not torch's 'iteration over a 0-d tensor')."""
    chains = None if route == "single chain" else 2
    transform = build(lambda params, batch: returns(params), SDEConfig(step_size=0.1, temperature=0.0), chains=chains)
    state = transform.init({"w": torch.zeros(3, dtype=DTYPE) if chains is None else torch.zeros(2, 3, dtype=DTYPE)})
    with pytest.raises(error) as raised:
        transform.update(state, None)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


def test_batched_log_posteriors_must_return_one_value_per_chain():
    transform = build(lambda p, b: (-(p["w"] ** 2).sum(), None), SDEConfig(step_size=0.1), chains=2,
                      vectorize="batched")
    with pytest.raises(ValueError, match=r"one value per chain \(vectorize='batched'\): shape \(2,\), got \(\)"):
        transform.update(transform.init({"w": torch.zeros(2, 3, dtype=DTYPE)}, seed=0), None)


# ----- issue 9: clear errors where there were none --------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("role", ["diffusion", "curl"])
def test_a_dense_operator_with_non_finite_entries_is_refused_at_build(bad, role):
    from bayesflow.engine import Dense

    matrix = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) if role == "diffusion" else torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    matrix[1, 0] = bad
    with pytest.raises(ValueError, match=r"Dense matrix must be finite; entry \(1, 0\)"):
        build(log_posterior, SDEConfig(step_size=0.1, **{role: Dense(matrix)}))
    full = torch.eye(4)
    full[0, 3] = bad
    with pytest.raises(ValueError, match=r"Block.dense matrix must be finite; entry \(0, 3\)"):
        Block.dense(full)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_params_at_init_name_the_leaf(bad):
    transform = build(log_posterior, SDEConfig(step_size=0.1))
    p = params()
    p["b"][1] = bad
    with pytest.raises(ValueError, match=r"params leaf 'b' holds NaN or infinite values"):
        transform.init(p, seed=0)


def test_a_non_finite_value_at_step_zero_says_the_value_is_at_fault():
    transform = build(log_posterior, SDEConfig(step_size=0.1))
    with pytest.raises(FloatingPointError, match=r"value is nan at step 0 \(the params are finite"):
        transform.update(transform.init(params(), seed=0), "nan-value")


def test_a_log_posterior_that_ignores_its_params_says_how_to_fix_it():
    """model(x) instead of functional_call(model, params, x): all gradients missing, nothing would move."""
    model = torch.nn.Linear(3, 1)

    def wrong(p, batch):
        return -model(batch).pow(2).mean(), None

    def partly_unused(p, batch):  # some unused leaves stay allowed (zero gradient)
        return -torch.func.functional_call(model, {"weight": p["weight"], "bias": model.bias}, (batch,)).pow(
            2).mean(), None

    params_ = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(8, 3)
    for vectorize in (None, "vmap"):
        transform = build(wrong, SDEConfig(step_size=0.1, temperature=0.0))
        if vectorize:
            from bayesflow.ensemble import lift, replicate

            transform = lift(transform, 2)
            state = transform.init(replicate(params_, 2), seed=0)
        else:
            state = transform.init(params_, seed=0)
        with pytest.raises(ValueError, match=r"does not depend on any of the params.*functional_call"):
            transform.update(state, x)
    transform = build(partly_unused, SDEConfig(step_size=0.1, temperature=0.0))
    state, _ = transform.update(transform.init(params_, seed=0), x)
    assert torch.equal(state.params["bias"], params_["bias"]) and not torch.equal(state.params["weight"],
                                                                                    params_["weight"])


def test_states_of_the_wrong_chain_count_say_so_in_chain_terms():
    from bayesflow.ensemble import lift, replicate

    single = build(log_posterior, SDEConfig(step_size=0.1))
    four, three = lift(single, 4), lift(single, 3)
    batched = four.init(replicate(params(), 4), seed=0)
    with pytest.raises(ValueError, match=r"holds 4 chains but the transform advances a single chain.*lift"):
        single.update(batched, None)
    with pytest.raises(ValueError, match=r"single chain but the transform advances 4 chains"):
        four.update(single.init(params(), seed=0), None)
    with pytest.raises(ValueError, match=r"holds 4 chains but the transform advances 3"):
        three.update(batched, None)


def test_update_under_inference_mode_names_inference_mode():
    """The log posterior does depend on its params; inference mode is what switched autograd off."""
    from bayesflow.sgmcmc import sghmc

    transform = sghmc.build(lambda p, batch: (-0.5 * (p**2).sum(), None), lr=0.1, temperature=1.0)
    state = transform.init(torch.ones(4), seed=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch.inference_mode\(\)"):
        transform.update(state, None)


@pytest.mark.parametrize(("fields", "name"), [
    (dict(step_size=lambda t: 0.1 if t == 0 else float("nan")), "step size"),
    (dict(step_size=lambda t: -0.1), "step size"),
    (dict(step_size=0.1, temperature=lambda t: float("inf")), "temperature"),
    (dict(step_size=0.1, temperature=lambda t: -1.0), "temperature")])
def test_a_schedules_bad_value_is_refused_naming_the_step_before_anything_is_written(fields, name):
    transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), SDEConfig(**fields))
    state = transform.init(torch.ones(2), seed=0)
    if name == "step size" and "nan" in repr(fields["step_size"](1)):
        state, _ = transform.update(state, None, inplace=True)
    before = state.params.clone()
    with pytest.raises(ValueError, match=f"the {name} schedule returned .* at step {int(state.step)}"):
        transform.update(state, None, inplace=True)
    assert torch.equal(state.params, before)
