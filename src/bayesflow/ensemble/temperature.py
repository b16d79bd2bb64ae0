r"""Physics checks: does a sampler run at the temperature it was asked for?

The engine samples :math:`p(θ, m) \propto \exp(-H/T)` with :math:`H = U(θ) + \tfrac12 m^\top M^{-1} m`,
:math:`U = -ℓ/N` (ℓ the user's log posterior, N the config's ``num_data``: 1 for per-datum values). Two
equipartition identities then hold *per coordinate* :math:`i`, so also for every parameter group
(leaf) :math:`g` by summing over :math:`i \in g`:

- **kinetic**: :math:`\mathbb E[m_i^2 / M_i] = T`, so :math:`T_{kin,g} = \frac{1}{|g|}\sum_{i\in g} m_i^2/M_i`;
- **configurational** (Rugh 1997; Jepps, Ayton and Evans 2000): integrating by parts,
  :math:`\mathbb E[(\partial_i U)^2] = T\,\mathbb E[\partial_i^2 U]`, so

  .. math::
      T_{conf,g} = \frac{\mathbb E\big[\sum_{i\in g} (\partial_i U)^2\big]}
                        {\mathbb E\big[\sum_{i\in g} \partial_i^2 U\big]}.

  The Laplacian block :math:`\sum_{i\in g}\partial_i^2 U` is exact (one Hessian-vector product per
  coordinate, vectorised) or a Hutchinson estimate :math:`\sum_{i\in g} z_i (Hz)_i` with Rademacher
  :math:`z` (unbiased, one product per probe), both by ``torch.func`` (reverse-over-reverse Hessian-vector products).
- **virial** (no second derivatives): :math:`\mathbb E[θ_i\,\partial_i U] = T`, so
  :math:`T_{vir,g} = \mathbb E[\sum_{i\in g} θ_i \partial_i U] / |g|`.

With per-datum ℓ (N = 1) the Bayesian posterior is T = 1/num_data; a deep ensemble runs at T = 0. The
kinetic check sees the momenta (the thermostat); the configurational ones see the positions, i.e. what
the samples are actually distributed as (a stochastic-gradient or discretisation bias shows up here).

Example:
    >>> import torch
    >>> from bayesflow.ensemble import configurational_temperature
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params["w"] ** 2).sum(), None
    >>> samples = {"w": 0.3 * torch.randn(1000, 5, generator=torch.Generator().manual_seed(0))}  # N(0, T), T = 0.09
    >>> configurational_temperature(log_posterior, samples, None)  # ≈ 0.09
    {'w': tensor(0.0885)}
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from torch.func import grad, vjp, vmap

from bayesflow.tree import flatten, unflatten
from bayesflow.types import LogPosterior, TensorTree

__all__ = [
    "ConfigurationalTerms",
    "configurational_temperature",
    "configurational_terms",
    "kinetic_temperature",
    "virial_temperature",
]

ESTIMATORS = ("exact", "hutchinson")


class ConfigurationalTerms(NamedTuple):
    """Per-sample, per-leaf terms of the configurational estimators (each a tree of ``(S,)`` tensors).

    Attributes:
        grad_sq: :math:`\\sum_{i\\in g} (\\partial_i U)^2`.
        laplacian: :math:`\\sum_{i\\in g} \\partial_i^2 U` (exact or a Hutchinson estimate).
        virial: :math:`\\sum_{i\\in g} θ_i \\partial_i U`.
        size: the number of coordinates :math:`|g|` of every leaf (a tree of ints).
    """

    grad_sq: TensorTree
    laplacian: TensorTree
    virial: TensorTree
    size: TensorTree


def kinetic_temperature(momenta: TensorTree, mass: Any = 1.0, *, per_chain: bool = False) -> TensorTree:
    r"""Kinetic temperature per leaf: :math:`T_{kin,g} = \frac{1}{|g|}\sum_{i\in g} m_i^2 / M_i`.

    At equilibrium :math:`m \sim N(0, T M)`, so every leaf's value estimates T with standard error
    :math:`T\sqrt{2/n}` for ``n`` independent entries averaged.

    Args:
        momenta: the momenta tree (``state.momenta``), any leading chain / sample dimensions included.
        mass: the diagonal of M: a float, a tensor broadcasting against every leaf, or a tree like
            ``momenta`` whose leaves broadcast against its leaves.
        per_chain: keep the first dimension (chains): average over the others only.

    Returns:
        A tree like ``momenta`` with a scalar (or a ``(chains,)`` tensor) per leaf.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import kinetic_temperature
        >>> m = {"w": torch.randn(8, 100, generator=torch.Generator().manual_seed(0)) * 0.5}  # T = 0.25, M = 1
        >>> kinetic_temperature(m)["w"]  # ≈ 0.25 ± 0.25·sqrt(2/800)
        tensor(0.2609)
    """
    if momenta is None:
        raise ValueError("momenta is None: first-order dynamics (SGLD, SGD) have no kinetic temperature")
    leaves, spec = flatten(momenta)
    if isinstance(mass, (int, float, torch.Tensor)):
        masses = [mass] * len(leaves)
    else:
        masses, mass_spec = flatten(mass)
        if mass_spec != spec:
            raise ValueError(f"mass must be a float, a tensor or a tree like momenta ({spec}); got {mass_spec}")
    if isinstance(mass, (int, float)) and mass <= 0:
        raise ValueError(f"mass must be positive, got {mass!r}")
    energies = [(m * m / torch.as_tensor(mm, dtype=m.dtype, device=m.device)).detach() for m, mm in zip(leaves, masses)]
    out = []
    for e in energies:
        if per_chain:
            if e.ndim == 0:
                raise ValueError("per_chain=True needs momenta leaves with a leading chain dimension")
            out.append(e.reshape(e.shape[0], -1).mean(dim=1))
        else:
            out.append(e.mean())
    return unflatten(spec, out)


def configurational_terms(
    log_posterior: LogPosterior,
    params: TensorTree,
    batch: Any,
    *,
    num_data: float = 1.0,
    estimator: Literal["exact", "hutchinson"] = "exact",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> ConfigurationalTerms:
    r"""Per-sample terms :math:`\sum_{i\in g}(\partial_i U)^2`, :math:`\sum_{i\in g}\partial_i^2 U` and
    :math:`\sum_{i\in g} θ_i\partial_i U` of every leaf ``g``, with :math:`U = -ℓ(θ, \text{batch})/N`.

    Accumulate these over a run (sums of numerators and denominators) to get running or per-chain
    temperatures; :func:`configurational_temperature` is their ratio of means.

    The exact Laplacian takes one Hessian-vector product per coordinate (``d`` in all, vectorised by
    ``torch.func.vmap`` and ``chunk_size`` at a time) — for small models and checks. ``"hutchinson"`` uses
    ``num_probes`` Rademacher probes :math:`z` shared by all leaves: :math:`\frac1P\sum_p \sum_{i\in g}
    z_{p,i}(H z_p)_i` is unbiased for every leaf's block of the Laplacian.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``; must work under ``torch.func``.
        params: a tree whose leaves carry a leading sample axis ``S`` (chains or stored draws).
        batch: the data passed to every call (the same for all samples).
        num_data: N of the engine's configuration (1 for a per-datum log posterior).
        estimator: ``"exact"`` or ``"hutchinson"``.
        num_probes: Rademacher probes per sample for ``"hutchinson"``.
        generator: the random stream of the probes.
        chunk_size: at most this many Hessian-vector products at once, over samples and probes
            (``None``: all ``S·d`` or ``S·num_probes`` together); bounds the memory of the exact Laplacian.

    Returns:
        :class:`ConfigurationalTerms` with ``(S,)`` tensors per leaf.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import configurational_terms
        >>> def log_posterior(params, batch):  # a standard Gaussian; no data
        ...     return -0.5 * (params["w"] ** 2).sum(), None
        >>> terms = configurational_terms(log_posterior, {"w": torch.randn(3, 5)}, None)  # 3 samples
        >>> terms.laplacian["w"]  # = 5 for U = |w|²/2
        tensor([5., 5., 5.])
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if not isinstance(num_data, (int, float)) or num_data <= 0:
        raise ValueError(f"num_data must be a positive float, got {num_data!r}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes!r}")
    leaves, spec = flatten(params)
    if not leaves or any(p.ndim == 0 for p in leaves) or len({p.shape[0] for p in leaves}) != 1:
        raise ValueError(
            "params must be a tree whose leaves share a leading sample axis; got shapes "
            f"{[tuple(p.shape) for p in leaves]} (add one with p.unsqueeze(0) for a single parameter set)"
        )
    leaves = [p.detach() for p in leaves]
    samples = leaves[0].shape[0]
    shapes = [p.shape[1:] for p in leaves]
    sizes = [s.numel() for s in shapes]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    dim = sum(sizes)

    def potential(flat_leaves):
        value, _ = log_posterior(unflatten(spec, list(flat_leaves)), batch)
        return -value / num_data

    grad_u = grad(potential)

    def per_sample(theta, probes):
        g, pullback = vjp(grad_u, theta)  # H is symmetric: the vector-Jacobian product of ∇U is Hv
        grad_sq = torch.stack([(x * x).sum() for x in g])
        virial = torch.stack([(t * x).sum() for t, x in zip(theta, g)])
        inner = None if chunk_size is None else min(chunk_size, probes[0].shape[0])
        (hv,) = vmap(pullback, chunk_size=inner)(probes)
        if estimator == "exact":  # probes are the basis vectors: row offset+k of leaf j is e_{offset+k}
            lap = [h.reshape(dim, n)[o: o + n].diagonal().sum() for h, n, o in zip(hv, sizes, offsets)]
        else:
            lap = [(z * h).reshape(num_probes, -1).sum(dim=1).mean() for z, h in zip(probes, hv)]
        return grad_sq, torch.stack(lap), virial

    def outer(vectors_per_sample: int) -> int | None:  # samples at once, so that ≤ chunk_size products run
        return None if chunk_size is None else max(1, chunk_size // vectors_per_sample)

    theta = tuple(leaves)
    ref = leaves[0]
    if estimator == "exact":
        eye = torch.eye(dim, dtype=ref.dtype, device=ref.device)
        basis = tuple(eye[:, o: o + n].reshape(dim, *s).to(p.dtype) for o, n, s, p in zip(offsets, sizes, shapes,
                                                                                          leaves))
        grad_sq, lap, virial = vmap(per_sample, in_dims=(0, None), chunk_size=outer(dim))(theta, basis)
    else:
        flat = torch.randint(0, 2, (samples, num_probes, dim), generator=generator, device=ref.device)
        flat = flat.to(ref.dtype).mul_(2).sub_(1)
        probes = tuple(flat[..., o: o + n].reshape(samples, num_probes, *s).to(p.dtype)
                       for o, n, s, p in zip(offsets, sizes, shapes, leaves))
        grad_sq, lap, virial = vmap(per_sample, in_dims=(0, 0), chunk_size=outer(num_probes))(theta, probes)
    split = [list(t.unbind(dim=1)) for t in (grad_sq, lap, virial)]
    return ConfigurationalTerms(*(unflatten(spec, s) for s in split), unflatten(spec, sizes))


def configurational_temperature(
    log_posterior: LogPosterior,
    params: TensorTree,
    batch: Any,
    *,
    num_data: float = 1.0,
    estimator: Literal["exact", "hutchinson"] = "exact",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> TensorTree:
    r"""Configurational temperature per leaf (Rugh 1997; Jepps, Ayton and Evans 2000).

    .. math::
        T_{conf,g} = \frac{\frac1S\sum_s \sum_{i\in g} (\partial_i U(θ_s))^2}
                          {\frac1S\sum_s \sum_{i\in g} \partial_i^2 U(θ_s)}, \qquad U = -ℓ/N,

    over the ``S`` samples :math:`θ_s` (the leading axis of every leaf). It estimates T when the samples
    follow :math:`\exp(-U/T)`: for a Gaussian :math:`U = \tfrac12 θ^\top A θ` and :math:`θ \sim N(0, T A^{-1})`
    the numerator's mean is :math:`T\,\mathrm{tr}(A_{gg})` and the denominator is :math:`\mathrm{tr}(A_{gg})`.
    Arguments are those of :func:`configurational_terms`.

    Returns:
        A tree like ``params`` with a scalar tensor per leaf.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import configurational_temperature
        >>> def log_posterior(params, x):
        ...     return torch.distributions.Normal(params["mu"], 1.0).log_prob(x).mean(), None
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(100, generator=g)
        >>> draws = {"mu": x.mean() + torch.randn(500, generator=g) / 10}  # the exact posterior: T = 1/100
        >>> configurational_temperature(log_posterior, draws, x)  # ≈ 0.01
        {'mu': tensor(0.0095)}
    """
    terms = configurational_terms(log_posterior, params, batch, num_data=num_data, estimator=estimator,
                                  num_probes=num_probes, generator=generator, chunk_size=chunk_size)
    num, _ = flatten(terms.grad_sq)
    den, spec = flatten(terms.laplacian)
    return unflatten(spec, [a.mean() / b.mean() for a, b in zip(num, den)])


def virial_temperature(
    log_posterior: LogPosterior, params: TensorTree, batch: Any, *, num_data: float = 1.0
) -> TensorTree:
    r"""Virial (first-derivative) configurational temperature per leaf: no Hessian needed.

    .. math::
        T_{vir,g} = \frac{1}{|g|}\,\frac1S\sum_s \sum_{i\in g} θ_{s,i}\,\partial_i U(θ_s), \qquad U = -ℓ/N,

    from :math:`\mathbb E[θ_i \partial_i U] = T` (integration by parts; needs tails lighter than
    :math:`1/|θ|`). Cheaper than :func:`configurational_temperature` for large models but noisier, and
    it depends on the origin of θ where the Rugh form does not.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``; must work under ``torch.func``.
        params: a tree whose leaves carry a leading sample axis.
        batch: the data passed to every call.
        num_data: N of the engine's configuration.

    Returns:
        A tree like ``params`` with a scalar tensor per leaf.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import virial_temperature
        >>> def log_posterior(params, batch):  # a standard Gaussian: U = |w|²/2
        ...     return -0.5 * (params["w"] ** 2).sum(), None
        >>> w = 0.3 * torch.randn(1000, 5, generator=torch.Generator().manual_seed(0))  # T = 0.3² = 0.09
        >>> virial_temperature(log_posterior, {"w": w}, None)  # ≈ 0.09
        {'w': tensor(0.0885)}
    """
    if not isinstance(num_data, (int, float)) or num_data <= 0:
        raise ValueError(f"num_data must be a positive float, got {num_data!r}")
    leaves, spec = flatten(params)
    if not leaves or any(p.ndim == 0 for p in leaves) or len({p.shape[0] for p in leaves}) != 1:
        raise ValueError(f"params must be a tree whose leaves share a leading sample axis; got shapes "
                         f"{[tuple(p.shape) for p in leaves]}")

    def potential(flat_leaves):
        value, _ = log_posterior(unflatten(spec, list(flat_leaves)), batch)
        return -value / num_data

    theta = tuple(p.detach() for p in leaves)
    g = vmap(grad(potential))(theta)
    return unflatten(spec, [(t * x).reshape(t.shape[0], -1).sum(dim=1).mean() / t[0].numel()
                            for t, x in zip(theta, g)])
