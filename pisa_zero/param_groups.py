"""Route a model's parameters to preconditioners by what they are, not by their number of dimensions.

Transformer block matrices (the weights of Linear layers and of GPT-2's Conv1D) go to the matrix preconditioner
(``nsisa``); token/position embeddings, the output head (tied or not), norms and biases go to the "other" one
(the auxiliary ``adamw`` by default, or ``sisa``). Embeddings and lm_head are 2-D too, which is why ``ndim`` alone
cannot decide. Under DeepSpeed ``zero.Init`` parameters are 1-D partitions: their real shape is ``ds_shape``.
"""

from __future__ import annotations

import torch
from torch import nn


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def _is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 uses Conv1D (a Linear with transposed weight); Megatron has its own *Linear classes.
    name = type(module).__name__
    return isinstance(module, nn.Linear) or name == "Conv1D" or name.endswith("Linear")


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(block matrices, everything else), each parameter once (tied weights are shared, not duplicated)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = {id(p) for p in head.parameters()} if head is not None else set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            excluded.update(id(p) for p in module.parameters(recurse=False))
    matrices, others, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_matrix = _is_linear(module) and name == "weight" and len(_shape(p)) == 2 and id(p) not in excluded
            (matrices if is_matrix else others).append(p)
    return matrices, others


def param_groups(
    model: nn.Module,
    *,
    matrix_preconditioner: str = "nsisa",
    other_preconditioner: str = "adamw",
    matrix_options: dict | None = None,
    other_options: dict | None = None,
) -> list[dict]:
    """Two PISA param groups for ``model``: block matrices and the rest, each with its own options.

    ``other_preconditioner="adamw"`` needs an ``lr`` (default 3e-3 here; override in ``other_options``).
    """
    matrices, others = split_parameters(model)
    other_defaults = {"lr": 3e-3, "weight_decay": 0.0} if other_preconditioner == "adamw" else {}
    groups = []
    if matrices:
        groups.append({"params": matrices, "preconditioner": matrix_preconditioner, **(matrix_options or {})})
    if others:
        groups.append(
            {"params": others, "preconditioner": other_preconditioner, **other_defaults, **(other_options or {})}
        )
    return groups
