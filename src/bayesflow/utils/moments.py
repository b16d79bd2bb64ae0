r"""Running moments: posteriors' ``cumulative_mean_and_cov``, vectorised (one concept: moments of prefixes).

The name, signature and conventions are those of ``posteriors.utils.cumulative_mean_and_cov``
(normal-computing/posteriors); the implementation replaces its Python loop by cumulative sums.

Example:
    >>> import torch
    >>> from bayesflow.utils import cumulative_mean_and_cov
    >>> means, covs = cumulative_mean_and_cov(torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, 0.0]]))
    >>> means[-1], covs[-1]  # the mean and unbiased covariance of all three points
    (tensor([2.0000, 0.6667]), tensor([[4.0000, 0.0000],
            [0.0000, 1.3333]]))
"""

from __future__ import annotations

import torch

__all__ = ["cumulative_mean_and_cov"]


def cumulative_mean_and_cov(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Running means and (unbiased) covariances of the first ``k = 1..n`` rows of ``xs``, all at once.

    For rows :math:`x_1..x_n \in \mathbb{R}^d` and :math:`k = 1..n`:

    .. math::
        m_k = \frac1k \sum_{i \le k} x_i, \qquad
        C_k = \frac{1}{k-1} \sum_{i \le k} (x_i - m_k)(x_i - m_k)^\top \quad (k \ge 2), \qquad C_1 = I_d,

    the values of posteriors' Welford loop :math:`C_k = \frac{k-2}{k-1} C_{k-1} + \frac1k δ_kδ_k^\top`,
    :math:`δ_k = x_k - m_{k-1}` (whose :math:`C_1 = I` is a placeholder: one row has no covariance). Here
    without a loop over ``n``: with a shift :math:`c = m_n` (covariances do not depend on it),
    :math:`y_i = x_i - c`, running sums :math:`s_k = \sum_{i \le k} y_i` and :math:`S_k = \sum_{i \le k}
    y_i y_i^\top` (``cumsum``), :math:`m_k = c + s_k / k` and :math:`C_k = (S_k - s_k s_k^\top / k) / (k - 1)`.
    The sums are accumulated in float64 (except on MPS) and the results cast back; time and memory
    :math:`O(n d^2)`.

    Args:
        xs: a tensor of shape ``(n, d)``, ``n ≥ 1`` (``n`` draws of a ``d``-vector); integer or bool input
            is treated as the default float dtype.

    Returns:
        ``(means, covs)`` of shapes ``(n, d)`` and ``(n, d, d)``, in the dtype and on the device of ``xs``;
        ``means[k - 1]`` is :math:`m_k` and ``covs[k - 1]`` is :math:`C_k`.

    Raises:
        TypeError: ``xs`` is not a real tensor.
        ValueError: ``xs`` is not 2-dimensional or has no rows.

    Example:
        >>> import torch
        >>> from bayesflow.utils import cumulative_mean_and_cov
        >>> xs = torch.randn(100_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> means, covs = cumulative_mean_and_cov(xs)
        >>> means.shape, covs.shape, torch.equal(covs[0], torch.eye(3, dtype=torch.float64))
        (torch.Size([100000, 3]), torch.Size([100000, 3, 3]), True)
        >>> torch.allclose(covs[999], xs[:1000].T.cov()), torch.allclose(means[-1], xs.mean(0))
        (True, True)
    """
    if not isinstance(xs, torch.Tensor):
        raise TypeError(f"cumulative_mean_and_cov expects a torch.Tensor of shape (n, d), got {type(xs).__name__}")
    if xs.is_complex():
        raise TypeError(f"cumulative_mean_and_cov expects a real tensor, got dtype {xs.dtype}")
    if xs.ndim != 2 or xs.shape[0] < 1:
        raise ValueError(f"cumulative_mean_and_cov expects xs of shape (n, d) with n ≥ 1 rows, "
                         f"got shape {tuple(xs.shape)}")
    dtype = xs.dtype if xs.is_floating_point() else torch.get_default_dtype()
    n, d = xs.shape
    x = xs.to(dtype if xs.device.type == "mps" else torch.float64)  # MPS has no float64
    shift = x.mean(dim=0)
    y = x - shift
    count = torch.arange(1, n + 1, dtype=x.dtype, device=x.device).unsqueeze(1)  # (n, 1)
    sums = y.cumsum(dim=0)  # s_k
    outer = (y.unsqueeze(2) * y.unsqueeze(1)).cumsum_(dim=0)  # S_k, (n, d, d)
    scaled = sums / count.sqrt()  # s_k / √k: S_k - s_k s_kᵀ / k = S_k - scaled scaledᵀ
    outer.addcmul_(scaled.unsqueeze(2), scaled.unsqueeze(1), value=-1)
    outer.div_((count - 1).clamp(min=1).unsqueeze(2))
    outer[0] = torch.eye(d, dtype=x.dtype, device=x.device)
    means = shift + sums / count
    means[0] = x[0]  # exactly, as posteriors' loop
    return means.to(dtype), outer.to(dtype)
