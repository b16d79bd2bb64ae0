r"""A pyro model as a bayesflow log posterior: sample pyro models with SG-MCMC, ensembles or VI.

For a pyro model with continuous latent sites :math:`x = (x_1, \dots, x_k)` (each on the support
of its distribution) and observed sites :math:`y`, bayesflow works in the *unconstrained* space
:math:`u`, :math:`x_i = t_i(u_i)` with :math:`t_i` = ``biject_to(site.support)`` (exp for positive
sites, the stick-breaking map for simplices, ...), as pyro's HMC/NUTS do. The log posterior is
the model's log joint density in :math:`u`, **per datum**:

.. math::
    ℓ(u; \text{batch}) = \frac{1}{N}\Big[\log p\big(t(u), y_\text{batch}\big)
        + \sum_i \log\Big|\det \frac{\partial t_i}{\partial u_i}\Big|\Big],

with :math:`N` = ``num_data`` and :math:`\log p` pyro's log joint (``poutine.trace(...).log_prob_sum()``:
priors, likelihood, ``pyro.factor`` terms, plate subsampling scales and masks included; discrete
latent sites are summed out by parallel enumeration, as NUTS does). This is bayesflow's convention
(README, :mod:`bayesflow.sgmcmc.sghmc`): samplers run at **temperature T = 1/N** sample
:math:`\exp(ℓ/T) = \exp(N ℓ)`, the exact posterior :math:`p(u \mid y)`; with ``num_data=1`` the
value is the full log posterior and T = 1 samples it. A mismatch — ``num_data=1`` with T = 1/N, or
``num_data=N`` with T = 1 — samples :math:`p^N` or :math:`p^{1/N}` (the test suite shows both fail).
:math:`N ℓ` equals ``-potential_fn(u)`` of ``pyro.infer.mcmc.util.initialize_model`` on the same
arguments.

**Mini-batches.** The model takes its data as arguments; ``batch`` replaces them (a tuple: the
positional arguments; a dict: keyword arguments). Declare the data plate with the full size,
``pyro.plate("data", size=N, subsample_size=len(y))``: pyro then scales the batch's likelihood by
N / len(y), so ℓ is an unbiased estimate of the full-data value (exactly its mean over a partition into
equal batches).

Example:
    >>> import pyro, pyro.distributions as dist, torch
    >>> from bayesflow.integrations import pyro as bf_pyro
    >>> from bayesflow.sgmcmc import sghmc
    >>> def model(y):
    ...     scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))          # positive: sampled as log(scale)
    ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(loc, scale), obs=y)
    >>> y = 3.0 + torch.randn(50, generator=torch.Generator().manual_seed(0))
    >>> pyro.set_rng_seed(0)                                                 # the initial point is drawn
    >>> posterior = bf_pyro.log_posterior(model, (y,), num_data=len(y))
    >>> sorted(posterior.params), sorted(posterior.transforms)
    (['loc', 'scale'], ['loc', 'scale'])
    >>> transform = sghmc.build(posterior.log_posterior, lr=0.1, alpha=1.0, temperature=1 / len(y))
    >>> state = transform.init(posterior.params, seed=0)
    >>> for _ in range(200):
    ...     state, constrained = transform.update(state, None)              # aux: the constrained values
    >>> draw = posterior.constrain(state.params)                            # one posterior draw of (loc, scale)
    >>> bool(abs(draw["loc"] - y.mean()) < 0.5), bool(0.5 < draw["scale"] < 2.0)   # sd of loc ≈ 0.14
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any, NamedTuple

import torch

from bayesflow.types import LogPosterior

__all__ = ["PyroLogPosterior", "log_posterior"]


def _pyro():
    try:
        import pyro
    except ImportError as error:  # pragma: no cover - exercised only without pyro
        raise ImportError("bayesflow.integrations.pyro needs pyro: pip install 'bayesflow[integrations]' "
                          "(or pip install pyro-ppl)") from error
    return pyro


class PyroLogPosterior(NamedTuple):
    """A pyro model as a bayesflow log posterior, with where to start and how to read the samples.

    Attributes:
        log_posterior: ``log_posterior(params, batch) -> (value, constrained)``: the per-datum log joint
            density of the unconstrained ``params`` (module docstring) and, as ``aux``, the constrained
            values :math:`t(u)` of the point it was evaluated at (detached).
        params: the initial point, one unconstrained tensor per continuous latent site (a dict keyed by
            site name, pyro's ``initial_params``).
        transforms: ``biject_to(support)`` per site: unconstrained → constrained (the inverse of
            ``initialize_model``'s transforms).
        num_data: N, the value's divisor (sample at temperature 1/N).
    """

    log_posterior: LogPosterior
    params: dict
    transforms: dict
    num_data: float

    def constrain(self, params: dict) -> dict:
        """Constrained values :math:`x_i = t_i(u_i)` of unconstrained ``params`` (any leading sample or
        chain dimensions: a trace ``(draws, *site_shape)`` maps draw by draw), as new tensors.

        Example:
            >>> import pyro, pyro.distributions as dist, torch
            >>> from bayesflow.integrations import pyro as bf_pyro
            >>> def model():
            ...     pyro.sample("rate", dist.Gamma(2.0, 1.0))
            >>> posterior = bf_pyro.log_posterior(model)
            >>> posterior.constrain({"rate": torch.tensor([0.0, 1.0])})["rate"]   # exp(u)
            tensor([1.0000, 2.7183])
        """
        if not isinstance(params, dict) or set(params) != set(self.transforms):
            raise ValueError(f"params must be a dict with the latent sites {sorted(self.transforms)} as keys, got "
                             f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
        constrained = {name: self.transforms[name](value) for name, value in params.items()}
        # an identity transform (a real-valued site) returns its input: copy it, so that a trace
        # collected from in-place steps does not alias the moving parameters
        return {name: value.clone() if value is params[name] else value for name, value in constrained.items()}


def log_posterior(model: Callable, model_args: tuple = (), model_kwargs: dict | None = None, *,
                  num_data: float = 1, init_strategy: Callable | None = None,
                  max_plate_nesting: int | None = None, validate: bool = False,
                  max_tries: int = 100) -> PyroLogPosterior:
    r"""The per-datum log posterior of a pyro model in unconstrained space (module docstring for the math).

    The model is traced once with ``model_args`` / ``model_kwargs`` (pyro's validation as pyro's global
    setting says) to find its continuous latent sites, their supports and an initial point; every later
    evaluation re-runs it conditioned on the constrained values.

    Args:
        model: a callable with pyro primitives (continuous latent sites; discrete ones are summed out by
            enumeration, needing static plate structure).
        model_args: positional arguments of the model, used when ``batch`` is None.
        model_kwargs: keyword arguments of the model.
        num_data: N > 0, the divisor of the log joint (1: the value is the full log posterior; the
            number of data: per datum, sample at temperature 1/N).
        init_strategy: pyro's per-site initialisation (``pyro.infer.autoguide.initialization``), default
            ``init_to_uniform`` as pyro's NUTS (it draws from torch's global generator: seed with
            ``pyro.set_rng_seed``).
        max_plate_nesting: pyro's bound on nested plates (guessed from a trace when None), needed to
            enumerate discrete sites.
        validate: run pyro's distribution argument checks inside every evaluation. Off by default:
            they branch on data, which ``torch.func.vmap`` (ensembles, VI over samples) cannot trace,
            and the model is validated once when traced here.
        max_tries: initial points drawn until the value and its gradient are finite.

    Returns:
        A :class:`PyroLogPosterior`: ``log_posterior(params, batch)`` takes ``batch`` None (the
        construction arguments), a tuple or list (new positional arguments: a mini-batch) or a dict
        (keyword arguments over ``model_kwargs``); ``params`` the initial point; ``transforms`` and
        ``constrain`` to map samples to the model's space.

    Raises:
        TypeError: ``model`` is not callable, ``model_args`` not a tuple, ``model_kwargs`` not a dict,
            or (when called) a ``batch`` of another type.
        ValueError: ``num_data`` is not a positive finite number, ``max_tries`` not a positive integer,
            the model has no continuous latent site, no finite initial point was found, or (when
            called) ``params`` is not a dict with exactly the latent sites as keys (pyro would draw a
            missing site from its prior, silently).

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from bayesflow.integrations import pyro as bf_pyro
        >>> def model(y):
        ...     loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(loc, 1.0), obs=y)
        >>> y = torch.tensor([0.5, 1.5])
        >>> posterior = bf_pyro.log_posterior(model, (y,), num_data=2)
        >>> value, aux = posterior.log_posterior({"loc": torch.tensor(1.0)}, None)
        >>> exact = (dist.Normal(0.0, 1.0).log_prob(torch.tensor(1.0)) + dist.Normal(1.0, 1.0).log_prob(y).sum()) / 2
        >>> torch.allclose(value, exact)
        True
        >>> value, aux = posterior.log_posterior({"loc": torch.tensor(1.0)}, (torch.tensor([1.0]),))  # new data
    """
    pyro = _pyro()
    from pyro import poutine
    from pyro.infer import config_enumerate
    from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
    from pyro.infer.mcmc.util import TraceEinsumEvaluator

    if not callable(model):
        raise TypeError(f"model must be a callable with pyro primitives, got {model!r:.80}")
    if not isinstance(model_args, tuple):
        raise TypeError(f"model_args must be a tuple of the model's positional arguments, got "
                        f"{type(model_args).__name__} (write (y,) for one argument)")
    model_kwargs = {} if model_kwargs is None else model_kwargs
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    if isinstance(num_data, bool) or not isinstance(num_data, Real) or not math.isfinite(num_data) or num_data <= 0:
        raise ValueError(f"num_data must be a positive finite number (the log joint is divided by it), "
                         f"got {num_data!r}")
    num_data = float(num_data)

    with poutine.block():
        plain = poutine.trace(model).get_trace(*model_args, **model_kwargs)
    if max_plate_nesting is None:  # pyro's _guess_max_plate_nesting: the deepest vectorised plate
        dims = [frame.dim for site in plain.nodes.values() if site["type"] == "sample"
                for frame in site["cond_indep_stack"] if frame.vectorized]
        max_plate_nesting = -min(dims) if dims else 0
    enumerated = model
    if any(site["fn"].has_enumerate_support for _, site in plain.iter_stochastic_nodes()):
        # discrete latent sites are summed out by parallel enumeration, as in pyro's initialize_model
        # (only then: pyro's enum handler reads ``.data``, which vmap forbids)
        enumerated = poutine.enum(config_enumerate(model), first_available_dim=-1 - max_plate_nesting)
    prototype = InitMessenger(init_strategy or init_to_uniform)(enumerated)

    def latent_sites(trace):
        sites, enumerable = {}, False
        for name, site in trace.iter_stochastic_nodes():
            if type(site["fn"]).__name__ == "_Subsample":  # a plate's index site, not a random variable
                continue
            if site["fn"].has_enumerate_support:
                enumerable = True
                continue
            sites[name] = site
        return sites, enumerable

    trace = poutine.trace(prototype).get_trace(*model_args, **model_kwargs)
    sites, enumerable = latent_sites(trace)
    if not sites:
        raise ValueError("the model has no continuous latent sample site: there is nothing to sample (observed "
                         "sites need obs=..., discrete latent sites are summed out)")
    transforms = {name: torch.distributions.biject_to(site["fn"].support) for name, site in sites.items()}
    names = set(transforms)
    evaluator = TraceEinsumEvaluator(trace, enumerable, max_plate_nesting)

    def arguments(batch) -> tuple[tuple, dict]:
        if batch is None:
            return model_args, model_kwargs
        if isinstance(batch, (tuple, list)):
            return tuple(batch), model_kwargs
        if isinstance(batch, dict):
            return model_args, {**model_kwargs, **batch}
        raise TypeError(f"batch must be None (the model's own arguments), a tuple or list of positional arguments "
                        f"or a dict of keyword arguments, got {type(batch).__name__}")

    def log_posterior_fn(params, batch):
        if not isinstance(params, dict) or params.keys() != names:
            # a missing site would be *sampled* from its prior by pyro, silently: refuse it
            raise ValueError(f"params must be a dict with the model's latent sites {sorted(names)} as keys, got "
                             f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
        args, kwargs = arguments(batch)
        constrained = {name: transforms[name](value) for name, value in params.items()}
        with pyro.validation_enabled(validate):
            conditioned = poutine.trace(poutine.condition(enumerated, constrained)).get_trace(*args, **kwargs)
            log_joint = evaluator.log_prob(conditioned)
        for name, value in params.items():  # the change of variables x = t(u)
            log_joint = log_joint + transforms[name].log_abs_det_jacobian(value, constrained[name]).sum()
        return log_joint / num_data, {name: value.detach() for name, value in constrained.items()}

    params = _initial_point(sites, transforms, log_posterior_fn, max_tries,
                            lambda: latent_sites(poutine.trace(prototype).get_trace(*model_args, **model_kwargs))[0])
    return PyroLogPosterior(log_posterior_fn, params, transforms, num_data)


def _initial_point(sites: dict, transforms: dict, log_posterior_fn, max_tries: int, retrace) -> dict[str, Any]:
    """Unconstrained values of the traced sites, redrawn until the value and gradient are finite
    (as pyro's ``_find_valid_initial_params``)."""
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"max_tries must be a positive integer, got {max_tries!r}")
    for _ in range(max_tries):
        params = {name: transforms[name].inv(site["value"].detach()).requires_grad_(True)
                  for name, site in sites.items()}
        with torch.enable_grad():
            value, _ = log_posterior_fn(params, None)
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        if bool(torch.isfinite(value)) and all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            return {name: value.detach() for name, value in params.items()}
        sites = retrace()
    raise ValueError(f"no initial point with a finite log density and gradient in {max_tries} draws of the init "
                     f"strategy: check the model's supports and data (or pass another init_strategy)")
