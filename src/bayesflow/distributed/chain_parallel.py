r"""Chain-parallel ensembles: K chains sharded over ranks, each block on the keys it has in one process.

Rank r of R holds the contiguous block of chains

.. math::
    C_r = \{\lfloor rK/R \rfloor, \dots, \lfloor (r+1)K/R \rfloor - 1\}

(sizes differ by at most one). Chain k of a batched run seeded s is a single chain seeded s + k
(:mod:`bayesflow.ensemble`), and chains do not interact, so a rank that advances the chains of C_r
with the seeds :math:`\{s + k : k ∈ C_r\}` computes the rows C_r of the one-process ensemble
(bitwise in float32 and float64; to rounding in bfloat16 and float16, see
:mod:`bayesflow.ensemble.chains`); :func:`gather_chains` puts the blocks back together (e.g. for
R-hat and ESS, :func:`chain_diagnostics`). No collective runs during the steps.

Example (one process: the block is every chain):
    >>> import torch
    >>> from bayesflow.distributed import chain_block, gather_chains, lift_block
    >>> from bayesflow.ensemble import replicate
    >>> from bayesflow.sgmcmc import sgld
    >>> single = sgld.build(lambda p, batch: (-0.5 * (p**2).sum(), None), lr=1e-2)
    >>> block = chain_block(8)
    >>> ensemble = lift_block(single, num_chains=8)
    >>> state = ensemble.init(replicate(torch.zeros(3), 8, perturbation=1.0, seed=0), seed=0)
    >>> state, aux = ensemble.update(state, None)
    >>> block, gather_chains(state.params, num_chains=8).shape
    (range(0, 8), torch.Size([8, 3]))
"""

from __future__ import annotations

import numbers

import optree
import torch

from bayesflow.distributed.reduce import all_gather, world
from bayesflow.ensemble.chains import lift
from bayesflow.ensemble.diagnostics import ess, rhat
from bayesflow.types import TensorTree, Transform

__all__ = ["chain_block", "chain_diagnostics", "gather_chains", "lift_block"]


def _check_num_chains(num_chains) -> None:
    if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
        raise ValueError(f"num_chains must be a positive integer, got {num_chains!r}")


def _bounds(num_chains: int, rank: int, size: int) -> range:
    return range(rank * num_chains // size, (rank + 1) * num_chains // size)


def chain_block(num_chains: int, group=None) -> range:
    r"""The global indices of this rank's chains: :math:`[\lfloor rK/R\rfloor, \lfloor (r+1)K/R\rfloor)`.

    Args:
        num_chains: K, the chains of the whole ensemble.
        group: the process group of the chain-parallel ranks (None: the default group, or one process).

    Returns:
        A ``range`` of chain indices.

    Raises:
        ValueError: ``num_chains`` is not a positive integer or is smaller than the world (a rank
            would hold no chain).

    Example:
        >>> from bayesflow.distributed import chain_block
        >>> chain_block(5)
        range(0, 5)
    """
    _check_num_chains(num_chains)
    rank, size = world(group)
    if num_chains < size:
        raise ValueError(f"{num_chains} chains over {size} ranks would leave a rank without a chain; "
                         "use at most num_chains ranks")
    return _bounds(num_chains, rank, size)


def _rows(tree, block: range, num_chains: int, name: str):
    """The block's rows of a tree whose leaves lead with the K chains (or already with the block)."""
    def rows(leaf):
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
            raise ValueError(f"{name} must be a tree of tensors with a leading chain dimension")
        if leaf.shape[0] == num_chains:
            return leaf[block.start:block.stop]
        if leaf.shape[0] == len(block):
            return leaf
        raise ValueError(f"{name} leads with {leaf.shape[0]} chains; expected {num_chains} (all chains) or "
                         f"{len(block)} (this rank's block {block})")
    return optree.tree_map(rows, tree)


def lift_block(transform: Transform, num_chains: int, group=None, *, temperature=None, step_size=None,
               vectorize: str = "vmap") -> Transform:
    """This rank's block of a K-chain ensemble of ``transform`` (:func:`bayesflow.ensemble.lift` on
    the block's chains).

    ``init(params, momenta=None, xi=None, seed=s)`` takes params (and momenta) of all K chains — the
    block's rows are kept — or of the block only, and an int seed ``s`` (chain k gets ``s + k``, as
    in one process) or a list of K seeds. Per-chain ``temperature`` / ``step_size`` tensors of K
    values are sliced to the block.

    Args:
        transform: an engine transform (a preset or ``build``), one chain.
        num_chains: K, the chains of the whole ensemble.
        group: the process group of the chain-parallel ranks (None: the default group, or one process).
        temperature, step_size, vectorize: as in :func:`bayesflow.ensemble.lift` (K values for all chains).

    Returns:
        A :class:`~bayesflow.types.Transform` with ``chains = len(chain_block(num_chains, group))``.

    Raises:
        TypeError: a seed that is not an int or a list of K ints (a random seed would not reproduce
            the one-process ensemble).
        ValueError: bad ``num_chains``, or params not leading with K or the block's chains.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import lift_block
        >>> from bayesflow.ensemble import lift
        >>> from bayesflow.sgmcmc import sgld
        >>> single = sgld.build(lambda p, batch: (-0.5 * (p**2).sum(), None), lr=1e-2)
        >>> temperatures = torch.tensor([0.0, 0.1, 1.0, 10.0])
        >>> block = lift_block(single, 4, temperature=temperatures)
        >>> whole = lift(single, 4, temperature=temperatures)
        >>> a, _ = block.update(block.init(torch.zeros(4, 2), seed=3), None)
        >>> b, _ = whole.update(whole.init(torch.zeros(4, 2), seed=3), None)
        >>> torch.equal(a.params, b.params)
        True
    """
    block = chain_block(num_chains, group)

    def sliced(value):
        if isinstance(value, (list, tuple)):
            value = torch.as_tensor(value, dtype=torch.float64)
        if isinstance(value, torch.Tensor) and value.ndim == 1:
            if value.numel() != num_chains:
                raise ValueError(f"got {value.numel()} per-chain values for {num_chains} chains")
            return value[block.start:block.stop]
        return value

    local = lift(transform, len(block), temperature=sliced(temperature), step_size=sliced(step_size),
                 vectorize=vectorize)

    def init(params, momenta=None, xi=None, seed=None):
        if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            seeds = [int(seed) + k for k in block]
        elif isinstance(seed, (list, tuple)) and len(seed) == num_chains:
            seeds = [seed[k] for k in block]
        else:
            raise TypeError(f"seed must be an int (chain k gets seed + k) or a list of {num_chains} ints, one per "
                            f"chain, so that every rank draws what one process would; got {seed!r}")
        params = _rows(params, block, num_chains, "params")
        if momenta is not None:
            momenta = _rows(momenta, block, num_chains, "momenta")
        if xi is not None and isinstance(xi, torch.Tensor) and xi.ndim == 1:
            xi = _rows(xi, block, num_chains, "xi")
        return local.init(params, momenta=momenta, xi=xi, seed=seeds)

    return local._replace(init=init)


def gather_chains(tree: TensorTree, num_chains: int, group=None) -> TensorTree:
    """Every rank's block of a tree put back together: leaves leading with this rank's chains ->
    leaves leading with all K chains, in chain order, on every rank (one all-gather per leaf).

    Works for params, momenta, traces shaped ``(block, draws, ...)`` and whole states whose tensor
    leaves all lead with the chain dimension (an :class:`~bayesflow.engine.SDEState`'s ``rng`` and
    ``step`` do); non-tensor leaves are kept as they are.

    Args:
        tree: a tensor or tree of tensors, each with the block's chains as leading dimension.
        num_chains: K.
        group: the process group (None: the default group, or one process: the tree itself).

    Returns:
        The tree with K chains in every tensor leaf.

    Raises:
        ValueError: a leaf does not lead with this rank's number of chains.
        CollectiveFailed: the all-gather failed (another rank raised, exited or timed out).

    Example:
        >>> import torch
        >>> from bayesflow.distributed import gather_chains
        >>> gather_chains({"w": torch.zeros(4, 2)}, num_chains=4)["w"].shape
        torch.Size([4, 2])
    """
    block = chain_block(num_chains, group)
    _, size = world(group)
    blocks = [_bounds(num_chains, r, size) for r in range(size)]
    longest = max(map(len, blocks))

    def gather(leaf):
        if not isinstance(leaf, torch.Tensor):
            return leaf
        if leaf.ndim == 0 or leaf.shape[0] != len(block):
            raise ValueError(f"every tensor must lead with this rank's {len(block)} chains, got shape "
                             f"{tuple(leaf.shape)}")
        if size == 1:
            return leaf
        padded = leaf.new_zeros((longest, *leaf.shape[1:]))
        padded[:len(block)] = leaf
        parts = all_gather(padded, group, what="gathering of the chains")
        return torch.cat([part[:len(b)] for part, b in zip(parts, blocks)]).to(leaf.device)

    return optree.tree_map(gather, tree, none_is_leaf=False)


def chain_diagnostics(trace: TensorTree, num_chains: int, group=None) -> dict:
    """R-hat and bulk ESS (:mod:`bayesflow.ensemble.diagnostics`) of the whole ensemble's trace.

    Args:
        trace: this rank's trace, shaped ``(block, draws, *param_shape)`` (or a tree of them).
        num_chains: K.
        group: the process group (None: the default group, or one process).

    Returns:
        ``{"rhat": ..., "ess": ...}``, each the tree of ``trace`` with one value per parameter,
        identical on every rank and equal to the one-process values on the K-chain trace.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import chain_diagnostics
        >>> trace = torch.randn(4, 200, 3, generator=torch.Generator().manual_seed(0))
        >>> out = chain_diagnostics(trace, num_chains=4)
        >>> out["rhat"].shape, bool((out["rhat"] < 1.05).all())
        (torch.Size([3]), True)
    """
    gathered = gather_chains(trace, num_chains, group)
    return {"rhat": rhat(gathered), "ess": ess(gathered)}
