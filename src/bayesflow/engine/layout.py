"""What a transform derives from the shapes of its parameters, once per parameter layout.

A transform is a pair of functions, so one transform may drive states of several parameter trees
(``init`` called twice with different models, or a state loaded from a checkpoint into a freshly
built transform). Everything the engine precomputes from the parameters — the tree structure, the
leaf shapes and dtypes, the resolved :class:`~bayesflow.engine.system.System` (per-leaf N), the noise
stream and the scratch buffers — lives in a :class:`Layout`, built and validated once per distinct
``(structure, shapes, dtypes, device)`` and looked up by the state being advanced.
"""

from __future__ import annotations

import torch

from bayesflow.engine.config import SDEConfig
from bayesflow.engine.gradients import Aliases
from bayesflow.engine.matrices import Function
from bayesflow.engine.noise import NoiseStream
from bayesflow.engine.system import System
from bayesflow.engine.validation import SMALL_CHECK_NUMEL, check_params, resolve_num_data


class Layout:
    """The engine's view of one parameter layout (validated at construction).

    Attributes:
        spec: the params tree structure.
        signature: ``[(shape, dtype)]`` per leaf (what ``step`` accepts as gradients).
        shapes: the leaf shapes.
        system: the configured SDE resolved for these leaves.
        noise: the seeded noise stream (one generator per chain).
        numel: scalar parameters per chain (the thermostat's dimension d).
        buffers: step-local scratch reused across steps (``Context.scratch``).
        plans: the compiled step's traced plans for these leaves (:mod:`bayesflow.engine.compiled`).
        small: whether the finiteness test takes its small-model route (one concatenation).
        aliases: the kept requires-grad aliases of in-place steps of a small model, or None.
    """

    def __init__(self, config: SDEConfig, chains: int | None, components: tuple[str, ...], leaves: list, spec):
        check_params(leaves)
        if chains is not None:
            for i, leaf in enumerate(leaves):
                if leaf.ndim == 0 or leaf.shape[0] != chains:
                    raise ValueError(f"with chains={chains} every params leaf needs a leading chain "
                                     f"dimension of {chains}; leaf {i} has shape {tuple(leaf.shape)}")
            for block in (config.diffusion_block, config.curl_block):
                for op in block.blocks.values():
                    if op.__class__.__name__ in ("Dense", "Function"):
                        raise ValueError(f"{op!r} acts on flat single-chain parameters and does not batch "
                                         "over chains; run chains separately")
        self.spec = spec
        self.signature = [(leaf.shape, leaf.dtype) for leaf in leaves]
        self.shapes = [leaf.shape for leaf in leaves]
        self.signature_head = (leaves[0].dtype, leaves[0].device)  # one dtype and device for all leaves
        xi_shape = torch.Size([chains]) if chains else torch.Size([])
        shapes = {"params": self.shapes, "momenta": self.shapes, "xi": [xi_shape]}
        shapes = {c: shapes[c] for c in components}
        diffusion, curl = config.diffusion_block, config.curl_block
        diffusion.check(shapes, "diffusion", "diffusion")
        curl.check(shapes, "curl", "curl")
        for name, block, role in (("diffusion", diffusion, "diffusion"), ("curl", curl, "curl")):
            op = block.blocks.get(("params", "params"))
            if isinstance(op, Function):
                op.validate_at(torch.cat([leaf.detach().reshape(-1) for leaf in leaves]), role, name)
        self.system = System(diffusion, curl, resolve_num_data(config.num_data, leaves), config.mass,
                             config.thermostat_target, config.weight_decay, config.gamma,
                             config.thermostat_mass)
        _check_operator_tensors(diffusion, curl, config.mass, leaves[0])
        self.noise = NoiseStream(leaves[0].device, chains)
        self.numel = sum(leaf[0].numel() if chains else leaf.numel() for leaf in leaves)
        self.xi_shape = xi_shape
        self.buffers: dict = {}
        self.plans: dict = {}  # traced steps of this layout (engine.compiled), one per kind of step
        self.small = sum(leaf.numel() for leaf in leaves) <= SMALL_CHECK_NUMEL
        self.aliases = Aliases() if self.small else None  # see gradients.Aliases: only where it pays

    @staticmethod
    def key(leaves: list, spec) -> tuple:
        """What identifies a layout: structure, shapes, dtypes and device of the leaves."""
        return (spec, tuple((leaf.shape, leaf.dtype) for leaf in leaves), leaves[0].device if leaves else None)


def _check_operator_tensors(diffusion, curl, mass, reference: torch.Tensor) -> None:
    """Operator tensors must share the parameters' dtype and device (checked here, not deep in torch)."""
    named = [(f"diffusion[{r}, {c}]", op) for (r, c), op in diffusion.blocks.items()]
    named += [(f"curl[{r}, {c}]", op) for (r, c), op in curl.blocks.items()] + [("mass", mass)]
    for where, op in named:
        for tensor in op.tensors():
            if tensor.dtype != reference.dtype or tensor.device != reference.device:
                raise ValueError(f"{where}: {op!r} holds a {tensor.dtype} tensor on {tensor.device}, but params are "
                                 f"{reference.dtype} on {reference.device}; convert the operator with .to()")
