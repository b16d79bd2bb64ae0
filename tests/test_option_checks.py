"""Bad options are refused at the boundary (construction or build), naming the value and what was expected."""

from __future__ import annotations

import math

import pytest
import torch

from bayesflow.engine import (
    BiasCorrection,
    Block,
    Constant,
    Cyclical,
    Diagonal,
    FirstStep,
    Scalar,
    SDEConfig,
    SemiImplicitEuler,
    build,
    hamiltonian_curl,
)
from bayesflow.engine.groups import TemperatureGroups
from bayesflow.laplace import dense_fisher, dense_ggn, dense_hessian, diag_fisher, diag_ggn, module_diag
from bayesflow.sgmcmc import csgld, sghmc, sgld
from bayesflow.tree import tree_leaves


def gaussian(params, batch):
    return -0.5 * (params**2).sum(), None


def tree_gaussian(params, batch):
    return -0.5 * sum((leaf**2).sum() for leaf in tree_leaves(params)), None


def _sghmc_config(**fields) -> SDEConfig:
    return SDEConfig(step_size=1e-2, diffusion=Block({("momenta", "momenta"): Scalar(0.1)}),
                     curl=hamiltonian_curl(1.0), integrator=SemiImplicitEuler(), temperature=1e-3, **fields)


def _run(config: SDEConfig, params=None, steps: int = 2, log_posterior=gaussian):
    transform = build(log_posterior, config)
    state = transform.init(torch.zeros(3) if params is None else params, seed=0)
    for _ in range(steps):
        state, _ = transform.update(state, None)
    return state


# ----- 1. SDEConfig's numeric fields ------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["weight_decay", "decoupled_weight_decay"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_weight_decay_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a finite non-negative number, got {value!r}"):
        SDEConfig(step_size=0.1, **{field: value})


@pytest.mark.parametrize("field", ["weight_decay", "decoupled_weight_decay"])
def test_a_negative_weight_decay_is_refused_naming_the_field(field):
    with pytest.raises(ValueError, match=rf"{field} must be a finite non-negative number, got -0.1"):
        SDEConfig(step_size=0.1, **{field: -0.1})


@pytest.mark.parametrize(("fields", "pattern"), [
    (dict(weight_decay="0.1"), r"weight_decay must be a finite non-negative number, got '0.1'"),
    (dict(weight_decay=True), r"weight_decay must be a finite non-negative number, got True"),
    (dict(thermostat_target=math.nan), r"thermostat_target must be a finite number, got nan"),
    (dict(thermostat_target=math.inf), r"thermostat_target must be a finite number, got inf"),
    (dict(thermostat_mass=math.nan), r"thermostat_mass must be a finite positive number, got nan"),
    (dict(thermostat_mass=0.0), r"thermostat_mass must be a finite positive number, got 0.0"),
    (dict(num_data=math.nan), r"num_data must be a finite positive number, got nan"),
    (dict(num_data=0), r"num_data must be a finite positive number, got 0"),
    (dict(num_data=True), r"num_data must be a finite positive number, got True"),
    (dict(num_data=[10.0, math.inf]), r"num_data entry 1 must be a finite positive number, got inf"),
    (dict(num_data={"a": 1.0, "b": -2.0}), r"num_data entry 1 must be a finite positive number, got -2.0"),
    (dict(temperature=math.nan), r"temperature must be finite and non-negative, got nan"),
    (dict(temperature={"*": math.nan}), r"temperature\['\*'\] must be a finite non-negative number"),
])
def test_other_numeric_fields_are_refused_at_construction(fields, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        SDEConfig(step_size=0.1, **fields)


@pytest.mark.parametrize("value", [math.nan, -0.1, math.inf])
def test_a_bad_step_size_is_refused_at_construction(value):
    with pytest.raises(ValueError, match=rf"step_size must be finite and non-negative, got {value}"):
        SDEConfig(step_size=value)


def test_a_bool_step_size_or_temperature_is_a_type_error():
    with pytest.raises(TypeError, match="step_size must be a float"):
        SDEConfig(step_size=True)
    with pytest.raises(TypeError, match="temperature must be a float"):
        SDEConfig(step_size=0.1, temperature=False)


def test_edge_values_of_the_numeric_fields_still_work():
    config = SDEConfig(step_size=0.1, weight_decay=0, decoupled_weight_decay=0.0, thermostat_target=-1.0,
                       num_data=1, temperature=0)
    assert config.weight_decay == 0 and config.decoupled_weight_decay == 0.0
    state = _run(config)
    assert torch.isfinite(state.params).all()
    decayed = _run(SDEConfig(step_size=0.1, temperature=0.0, weight_decay=0.5, decoupled_weight_decay=0.1),
                   params=torch.ones(3), steps=1)
    # θ ← (1 - ε)θ + h(∇ℓ(θ) - λθ), the gradient taken before the decay (AdamW's order)
    assert torch.allclose(decayed.params, torch.full((3,), 0.9 - 0.1 * 1.5))
    per_leaf = SDEConfig(step_size=0.1, num_data={"a": 10.0, "b": 2})
    _run(per_leaf, params={"a": torch.zeros(2), "b": torch.zeros(1)}, log_posterior=tree_gaussian)


def test_per_leaf_num_data_of_the_wrong_length_is_still_refused_at_init():
    with pytest.raises(ValueError, match="num_data has 3 entries but params has 1 leaves"):
        _run(SDEConfig(step_size=0.1, num_data=[1.0, 2.0, 3.0]))


# ----- 2. masses ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_a_non_positive_scalar_mass_is_refused_at_construction(value):
    with pytest.raises(ValueError, match=rf"mass must be positive .*got Scalar\({value:g}\)"):
        _sghmc_config(mass=Scalar(value))


@pytest.mark.parametrize(("entries", "minimum"), [([1.0, 0.0, 1.0], "0"), ([1.0, -1.0, 2.0], "-1")])
def test_a_diagonal_mass_with_entries_at_or_below_zero_is_refused(entries, minimum):
    with pytest.raises(ValueError, match=rf"mass must be positive .*Diagonal leaf 0 has entries <= 0 "
                                         rf"\(min {minimum}\)"):
        _sghmc_config(mass=Diagonal(torch.tensor(entries)))


def test_a_preset_whose_mass_underflows_to_zero_is_refused_naming_the_mass():
    with pytest.raises(ValueError, match=r"mass must be positive .*got Scalar\(0\)"):
        sghmc.build(gaussian, lr=0.1, sigma=1e-200)


def test_positive_masses_still_work():
    for mass in (Scalar(1e-3), Scalar(4.0), Diagonal(torch.tensor([0.5, 1.0, 2.0]))):
        state = _run(_sghmc_config(mass=mass))
        assert torch.isfinite(state.params).all() and torch.isfinite(state.momenta).all()


# ----- 3. schedules -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("period", [2.5, 0, -3, True, math.nan, "10", None])
def test_cyclical_refuses_a_period_that_is_not_a_positive_integer(period):
    with pytest.raises(ValueError, match=r"Cyclical period must be a positive integer number of steps, got"):
        Cyclical(initial=0.1, period=period)


def test_cyclical_edge_periods_still_work():
    assert Cyclical(initial=0.1, period=1)(0) == 0.1 and Cyclical(initial=0.1, period=1)(5) == 0.1
    whole = Cyclical(initial=0.1, period=100.0)  # an integral float is that many steps
    assert whole.period == 100 and isinstance(whole.period, int) and whole == Cyclical(initial=0.1, period=100)


@pytest.mark.parametrize(("fields", "pattern"), [
    (dict(initial=math.nan), r"Cyclical initial must be a finite number, got nan"),
    (dict(initial=math.inf), r"Cyclical initial must be a finite number, got inf"),
    (dict(initial="0.1"), r"Cyclical initial must be a finite number, got '0.1'"),
    (dict(initial=torch.tensor([0.1, math.nan])), r"Cyclical initial must be a finite number or a 1-D tensor"),
    (dict(initial=0.1, floor=math.nan), r"Cyclical floor must be a finite number, got nan"),
    (dict(initial=0.1, exploration=1.5), r"Cyclical exploration must be None or a fraction in \[0, 1\], got 1.5"),
    (dict(initial=0.1, exploration=-0.1), r"Cyclical exploration must be None or a fraction in \[0, 1\]"),
    (dict(initial=0.1, exploration=math.nan), r"Cyclical exploration must be None or a fraction in \[0, 1\], got nan"),
])
def test_cyclical_refuses_bad_values(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        Cyclical(period=10, **fields)


def test_cyclical_refuses_a_non_bool_anneal():
    with pytest.raises(TypeError, match="Cyclical anneal must be True or False, got 0"):
        Cyclical(initial=0.1, period=10, anneal=0)


def test_cyclical_edge_explorations_still_work():
    assert Cyclical(initial=1.0, period=4, exploration=0.0, anneal=False)(0) == 1.0
    assert Cyclical(initial=1.0, period=4, exploration=1.0, anneal=False)(3) == 0.0
    per_chain = Cyclical(initial=torch.tensor([0.1, 0.2]), period=4)
    assert torch.equal(per_chain(0), torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize(("schedule", "pattern"), [
    (lambda: Constant(math.nan), r"Constant value must be a finite number, got nan"),
    (lambda: BiasCorrection(beta=1.0), r"BiasCorrection beta must be a decay rate in \[0, 1\), got 1.0"),
    (lambda: BiasCorrection(beta=math.nan), r"BiasCorrection beta must be a decay rate in \[0, 1\), got nan"),
    (lambda: FirstStep(first=math.inf), r"FirstStep first must be a finite number, got inf"),
    (lambda: FirstStep(first=2.0, then=math.nan), r"FirstStep then must be a finite number, got nan"),
])
def test_the_other_schedules_refuse_non_finite_values(schedule, pattern):
    with pytest.raises(ValueError, match=pattern):
        schedule()


@pytest.mark.parametrize(("field", "schedule", "pattern"), [
    ("step_size", Cyclical(initial=-0.1, period=10), r"step_size Cyclical initial must be non-negative, got -0.1"),
    ("temperature", Cyclical(initial=1.0, period=10, exploration=0.5, floor=-1.0),
     r"temperature Cyclical floor must be non-negative, got -1.0"),
    ("temperature", Constant(-2.0), r"temperature Constant value must be non-negative, got -2.0"),
])
def test_a_negative_value_schedule_is_refused_when_configured(field, schedule, pattern):
    fields = {"step_size": 0.1, field: schedule}
    with pytest.raises(ValueError, match=pattern):
        SDEConfig(**fields)


# ----- 4. lr schedules of the presets ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", [sgld, sghmc])
def test_a_preset_refuses_a_negative_cyclical_lr_when_configured(preset):
    with pytest.raises(ValueError, match=r"lr Cyclical initial must be non-negative, got -0.1"):
        preset.build(gaussian, lr=Cyclical(initial=-0.1, period=10))


@pytest.mark.parametrize("preset", [sgld, sghmc])
@pytest.mark.parametrize("schedule", [lambda step: -0.1, lambda step: 0.1 if step < 1 else -0.1,
                                      lambda step: math.nan])
def test_a_preset_lr_schedule_returning_a_bad_value_is_refused_naming_the_step(preset, schedule):
    transform = preset.build(gaussian, lr=schedule, temperature=1.0)
    state = transform.init(torch.zeros(3), seed=0)
    if schedule(0) == 0.1:
        state, _ = transform.update(state, None)
    with pytest.raises(ValueError, match=rf"the step size schedule returned .* at step {int(state.step)}; "
                                         r"expected a finite number >= 0"):
        transform.update(state, None)


def test_a_schedule_returning_a_negative_numpy_scalar_is_refused_naming_the_step():
    np = pytest.importorskip("numpy")
    transform = sgld.build(gaussian, lr=lambda step: np.float32(-0.1))
    state = transform.init(torch.zeros(3), seed=0)
    with pytest.raises(ValueError, match=r"the step size schedule returned .* at step 0"):
        transform.update(state, None)


def test_a_negative_temperature_schedule_is_refused_at_init_of_a_momentum_preset():
    transform = sghmc.build(gaussian, lr=0.1, temperature=lambda step: -0.1)
    with pytest.raises(ValueError, match=r"the temperature schedule returned -0.1 at step 0"):
        transform.init(torch.zeros(3), seed=0)


def test_a_cyclical_lr_and_csgld_still_work():
    transform = sgld.build(gaussian, lr=Cyclical(initial=0.1, period=3), temperature=0.0)
    state = transform.init(torch.ones(3), seed=0)
    for _ in range(3):
        state, _ = transform.update(state, None)
    assert torch.isfinite(state.params).all()
    with pytest.raises(ValueError, match="cycle_length must be a positive integer"):
        csgld.build(gaussian, lr=0.1, cycle_length=2.5)
    assert csgld.config(lr=0.1, cycle_length=1).step_size == Cyclical(0.1, 1)


# ----- 5. per-group temperature patterns ------------------------------------------------------------------------
def _group_params():
    return {"body": {"weight": torch.zeros(2)}, "head": {"weight": torch.zeros(3), "bias": torch.zeros(1)}}


def test_a_temperature_pattern_matching_no_parameter_is_refused_at_init_listing_the_names():
    transform = sgld.build(tree_gaussian, lr=0.1, temperature={"haed.*": 1.0, "*": 0.0})
    with pytest.raises(ValueError, match=r"temperature pattern 'haed\.\*' matches no parameter .*the parameters are "
                                         r"'body\.weight', 'head\.bias', 'head\.weight'"):
        transform.init(_group_params(), seed=0)


def test_a_temperature_pattern_shadowed_by_an_earlier_one_is_refused():
    with pytest.raises(ValueError, match=r"temperature pattern 'head\.\*' never applies: every parameter it matches "
                                         r"\('head\.bias', 'head\.weight'\) is decided by the earlier pattern\(s\) "
                                         r"\['\*'\]"):
        TemperatureGroups({"*": 0.0, "head.*": 1.0}).resolve(_group_params())


def test_valid_temperature_patterns_still_work():
    values = TemperatureGroups({"head.*": 1.0, "*": 0.0}).resolve(_group_params()).values
    assert values == (0.0, 1.0, 1.0)
    # a catch-all left with nothing to decide is a default, not a typo
    head_only = {"head": {"weight": torch.zeros(3), "bias": torch.zeros(1)}}
    assert TemperatureGroups({"head.*": 1.0, "*": 0.0}).resolve(head_only).values == (1.0, 1.0)
    transform = sgld.build(tree_gaussian, lr=0.1, temperature={"head.*": 1.0, "*": 0.0})
    state, _ = transform.update(transform.init(_group_params(), seed=0), None)
    assert torch.equal(state.params["body"]["weight"], torch.zeros(2))


# ----- 6. Laplace initial precisions ----------------------------------------------------------------------------
def _forward(params, batch):
    return params * batch, None


def _outer(z, batch):
    return -0.5 * (z**2).sum()


def _diag_builders():
    model = torch.nn.Linear(2, 1)
    return {"diag_fisher": lambda v: diag_fisher.build(gaussian, init_prec_diag=v),
            "diag_ggn": lambda v: diag_ggn.build(_forward, _outer, init_prec_diag=v),
            "module_diag": lambda v: module_diag.build(model, _outer, init_prec_diag=v)}


def _dense_builders():
    return {"dense_fisher": lambda v: dense_fisher.build(gaussian, init_prec=v),
            "dense_ggn": lambda v: dense_ggn.build(_forward, _outer, init_prec=v),
            "dense_hessian": lambda v: dense_hessian.build(gaussian, init_prec=v)}


@pytest.mark.parametrize("name", ["diag_fisher", "diag_ggn", "module_diag"])
@pytest.mark.parametrize(("value", "pattern"), [
    ("a", r"init_prec_diag must be a number, a tensor or a tree of them shaped like params, got str 'a'"),
    (None, r"init_prec_diag must be a number, a tensor or a tree of them .*got None"),
    ({"w": "a"}, r"init_prec_diag\['w'\] must be a number, a tensor or a tree of them .*got str 'a'"),
    ([1.0, None], r"init_prec_diag\[1\] must be a number, a tensor or a tree of them .*got NoneType None"),
    (True, r"init_prec_diag must be a number, a tensor or a tree of them .*got bool True"),
    (torch.tensor([True, False]), r"init_prec_diag must hold real numbers .*dtype torch.bool"),
])
def test_a_diagonal_initial_precision_of_the_wrong_type_is_refused_at_build(name, value, pattern):
    with pytest.raises(TypeError, match=pattern):
        _diag_builders()[name](value)


@pytest.mark.parametrize("name", ["diag_fisher", "diag_ggn", "module_diag"])
@pytest.mark.parametrize(("value", "pattern"), [
    (math.nan, r"init_prec_diag must be a finite non-negative precision, got nan"),
    (-1.0, r"init_prec_diag must be a finite non-negative precision, got -1.0"),
    (torch.tensor([1.0, math.inf]), r"init_prec_diag must hold finite non-negative precisions"),
    ({"w": torch.tensor([1.0, -1.0])}, r"init_prec_diag\['w'\] must hold finite non-negative precisions"),
])
def test_a_diagonal_initial_precision_with_bad_values_is_refused_at_build(name, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        _diag_builders()[name](value)


@pytest.mark.parametrize("name", ["dense_fisher", "dense_ggn", "dense_hessian"])
@pytest.mark.parametrize(("value", "error", "pattern"), [
    ("a", TypeError, r"init_prec must be a number or a \(d, d\) tensor, got str 'a'"),
    ([[1.0, 0.0], [0.0, 1.0]], TypeError, r"init_prec must be a number or a \(d, d\) tensor, got list"),
    ({"w": 1.0}, TypeError, r"init_prec must be a number or a \(d, d\) tensor, got dict"),
    (torch.eye(2, dtype=torch.bool), TypeError, r"init_prec must hold real numbers .*dtype torch.bool"),
    (math.inf, ValueError, r"init_prec must be a finite non-negative precision, got inf"),
    (torch.tensor([[1.0, math.nan], [math.nan, 1.0]]), ValueError, r"init_prec must hold finite values"),
])
def test_a_dense_initial_precision_of_the_wrong_kind_is_refused_at_build(name, value, error, pattern):
    with pytest.raises(error, match=pattern):
        _dense_builders()[name](value)


def test_init_refuses_the_wrong_type_too():
    with pytest.raises(TypeError, match=r"init_prec_diag must be a number, a tensor or a tree"):
        diag_fisher.init(torch.zeros(2), init_prec_diag="a")
    with pytest.raises(TypeError, match=r"init_prec must be a number or a \(d, d\) tensor, got str"):
        dense_fisher.init(torch.zeros(2), init_prec="a")


def test_valid_initial_precisions_still_work():
    params = {"b": torch.zeros(1), "w": torch.zeros(2)}
    for value in (0, 2.0, torch.tensor(3.0), {"b": 1.0, "w": torch.tensor([1.0, 2.0])}):
        state = diag_fisher.build(tree_gaussian, init_prec_diag=value).init(params)
        assert all(torch.isfinite(leaf).all() for leaf in state.prec_diag.values())
    assert torch.equal(diag_fisher.init(params, init_prec_diag={"b": 1.0, "w": torch.tensor([1.0, 2.0])}
                                        ).prec_diag["w"], torch.tensor([1.0, 2.0]))
    off_diagonal = torch.tensor([[2.0, -0.5], [-0.5, 2.0]])  # negative entries of a PSD matrix are fine
    assert torch.equal(dense_fisher.build(gaussian, init_prec=off_diagonal).init(torch.zeros(2)).prec, off_diagonal)
    assert torch.equal(dense_fisher.build(gaussian, init_prec=0).init(torch.zeros(2)).prec, torch.zeros(2, 2))


def test_a_schedule_returning_a_numpy_scalar_is_taken_and_a_string_refused():
    np = pytest.importorskip("numpy")
    numpy_lr = sgld.build(gaussian, lr=lambda step: np.float32(0.25), temperature=0.0)
    float_lr = sgld.build(gaussian, lr=0.25, temperature=0.0)
    a, _ = numpy_lr.update(numpy_lr.init(torch.ones(3), seed=0), None)
    b, _ = float_lr.update(float_lr.init(torch.ones(3), seed=0), None)
    assert torch.equal(a.params, b.params)
    transform = sgld.build(gaussian, lr=lambda step: "0.1")
    with pytest.raises(TypeError, match=r"the step size schedule returned '0\.1' at step 0; expected a number"):
        transform.update(transform.init(torch.zeros(3), seed=0), None)
