r"""Control variates with the mode's per-datum gradients stored: one batch gradient a step.

:func:`~bayesflow.sgmcmc.control_variate.control_variate` pays a second batch gradient a step (at θ̂)
or caches the mode's terms per batch of a fixed partition. With batches given as **data indices**,
the mode's terms of any batch are means of per-datum quantities, which one pass over the data
computes once: :math:`G_i = \nabla ℓ_i(\hat θ)` and :math:`V_i = ℓ_i(\hat θ)` for i = 1..n
(``torch.func.vmap`` of ``torch.func.grad``: the cost of one full-data gradient, which the control
variate needs anyway — ∇ℓ(θ̂) is the mean of the G_i — and the memory of n parameter vectors).
Then, for a batch of indices B,

.. math::
    ℓ_{cv}(θ, B) = ℓ_B(θ) - \big[\bar V_B - ℓ(\hat θ)\big]
                   - \big\langle \bar G_B - \nabla ℓ(\hat θ),\ θ - \hat θ \big\rangle,
    \qquad \nabla ℓ_{cv} = \nabla ℓ(\hat θ) + \nabla ℓ_B(θ) - \bar G_B,

the same estimate as ``control_variate`` (exactly, tested) at one batch gradient per evaluation.
It composes with every preset and, evaluated per datum, with
:mod:`~bayesflow.sgmcmc.noise_corrected` (the per-sample gradients are those of ℓ_cv).

Example (the estimate on every batch equals the two-gradient control variate's; over all data it is
the full gradient):
    >>> import torch
    >>> from bayesflow.sgmcmc.control_variate import control_variate
    >>> from bayesflow.sgmcmc.control_variate_table import control_variate_table
    >>> g = torch.Generator().manual_seed(0)
    >>> X, y = torch.randn(50, 3, generator=g), torch.randn(50, generator=g)
    >>> def log_posterior(w, batch):        # batch: data indices (None: all data)
    ...     x, t = (X, y) if batch is None else (X[batch], y[batch])
    ...     return -0.5 * ((t - x @ w) ** 2).mean() - 0.5 * (w**2).sum() / 50, None
    >>> mode = torch.full((3,), 0.1)
    >>> table = control_variate_table(log_posterior, mode, num_data=50)
    >>> w, batch = torch.ones(3, requires_grad=True), torch.tensor([3, 7, 7, 41])
    >>> grad_table, = torch.autograd.grad(table(w, batch)[0], w)
    >>> grad_pair, = torch.autograd.grad(control_variate(log_posterior, mode, None)(w, batch)[0], w)
    >>> torch.allclose(grad_table, grad_pair, atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bayesflow.types import LogPosterior

__all__ = ["ControlVariateTable", "control_variate_table"]


class ControlVariateTable:
    """``log_posterior_cv(params, indices) -> (value, aux)`` of the module docstring (params a tensor,
    ``indices`` a LongTensor ``([K,] b)``, built by :func:`control_variate_table`).

    Attributes:
        mode: θ̂; full_value, full_gradient: ℓ(θ̂) and ∇ℓ(θ̂); gradients: the (n, d) table G of
        per-datum gradients at θ̂; values: the (n,) table V.
    """

    def __init__(self, log_posterior: LogPosterior, mode: torch.Tensor, num_data: int,
                 datum: Callable | None = None):
        if not callable(log_posterior):
            raise TypeError(f"log_posterior must be callable (params, batch) -> (value, aux), got {log_posterior!r}")
        if not isinstance(mode, torch.Tensor) or not mode.is_floating_point() or mode.ndim != 1:
            raise TypeError(f"mode must be a 1-D floating-point tensor (θ̂ flattened), got {mode!r}")
        if not bool(torch.isfinite(mode).all()):
            raise ValueError("mode has non-finite values: a mode must be finite (did the optimizer diverge?)")
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive integer (the data set's size), got {num_data!r}")
        self.log_posterior, self.num_data = log_posterior, num_data
        self.datum = datum if datum is not None else (lambda indices: indices)
        self.mode = mode.detach().clone()

        def one(params, index):  # ℓ_i(θ) of datum ``index`` (a 0-d LongTensor)
            return log_posterior(params, self.datum(index.reshape(1)))[0].reshape(())

        indices = torch.arange(num_data, device=mode.device)
        grads, values = torch.func.vmap(torch.func.grad_and_value(one), in_dims=(None, 0))(self.mode, indices)
        if not (bool(torch.isfinite(grads).all()) and bool(torch.isfinite(values).all())):
            raise ValueError("a per-datum log posterior or gradient at the mode is not finite: θ̂ must lie where the "
                             "log posterior is defined")
        self.gradients, self.values = grads.detach(), values.detach()
        # ℓ is the mean of the ℓ_i (per datum: likelihood + prior / n), so the full-data terms are the
        # tables' means — no second pass over the data
        self.full_value, self.full_gradient = self.values.mean(), self.gradients.mean(0)

    def __call__(self, params: torch.Tensor, indices: torch.Tensor):
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"a control-variate table takes batches of data indices (a LongTensor), got {indices!r}")
        value, aux = self.log_posterior(params, self.datum(indices))
        offset = self.gradients[indices].mean(-2) - self.full_gradient  # Ḡ_B − ∇ℓ(θ̂), ([K,] d)
        shift = self.values[indices].mean(-1) - self.full_value
        correction = (offset * (params - self.mode)).sum(-1)
        return value - shift - (correction if value.ndim else correction.sum()), aux


def control_variate_table(log_posterior: LogPosterior, mode: torch.Tensor, num_data: int, *,
                          datum: Callable[[torch.Tensor], object] | None = None) -> ControlVariateTable:
    r"""The control-variate log posterior over index batches, the mode's per-datum terms stored.

    .. math::
        \nabla ℓ_{cv}(θ, B) = \nabla ℓ(\hat θ) + \nabla ℓ_B(θ) - \frac1{|B|}\sum_{i \in B} \nabla ℓ_i(\hat θ)

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum (batch mean +
            log prior / N), ``torch.func`` transformable; params a 1-D tensor (or ``(K, d)`` chains
            with one value per chain).
        mode: θ̂, a 1-D tensor.
        num_data: n, the data set's size (indices run over 0..n−1); ℓ(θ̂) and ∇ℓ(θ̂) are the tables' means.
        datum: ``indices -> batch`` (default: the indices themselves, for a log posterior that indexes
            its own data).

    Returns:
        A :class:`ControlVariateTable`, callable as ``(params, indices) -> (value, aux)``.

    Raises:
        TypeError: a non-callable log posterior, a mode that is not a 1-D float tensor, index batches
            that are not integer tensors. ValueError: a non-finite mode or gradient at it, a bad n.

    Example:
        >>> import torch
        >>> from bayesflow.sgmcmc import sgld
        >>> from bayesflow.sgmcmc.control_variate_table import control_variate_table
        >>> data = torch.randn(100, generator=torch.Generator().manual_seed(0))
        >>> def log_posterior(m, batch):
        ...     x = data if batch is None else data[batch]
        ...     return -0.5 * ((x - m) ** 2).mean() - 0.5 * (m**2).sum() / 100, None
        >>> table = control_variate_table(log_posterior, torch.tensor([float(data.mean())]), num_data=100)
        >>> transform = sgld.build(table, lr=0.1, temperature=1 / 100)
        >>> state, _ = transform.update(transform.init(torch.zeros(1), seed=0), torch.randint(100, (10,)))
    """
    return ControlVariateTable(log_posterior, mode, num_data, datum)
