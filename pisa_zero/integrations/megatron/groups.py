"""Megatron's param groups, split for PISA: transformer block matrices and the rest, each with its preconditioner."""

from __future__ import annotations

import torch

#: Preconditioners that are exact on Megatron's 1-D parameter shards.
SHARD_PRECONDITIONERS = ("sisa", "adagrad", "identity", "adamw")
#: Preconditioners of the block matrices: the elementwise ones, and 'nsisa' (whole matrices routed to owner ranks).
MATRIX_PRECONDITIONERS = ("sisa", "adagrad", "identity", "nsisa")
#: Per-group overrides ``other_options`` may set for the non-matrix group.
OTHER_OPTION_KEYS = ("lr", "betas", "eps", "sigma", "rho", "beta2", "l2_lambda")


def block_matrices(model_chunks: list) -> set[int]:
    """ids of the transformer block matrices: 2-D weights of Megatron's (or TE's) ``*Linear`` modules, except the
    output layer (``is_embedding_or_output_parameter``). Word and position embeddings are not Linear modules."""
    ids = set()
    for chunk in model_chunks:
        for module in chunk.modules():
            weight = getattr(module, "weight", None) if type(module).__name__.endswith("Linear") else None
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                if not getattr(weight, "is_embedding_or_output_parameter", False):
                    ids.add(id(weight))
    return ids


def pisa_param_groups(
    model_chunks: list,
    config,
    config_overrides: dict | None = None,
    *,
    preconditioner: str = "sisa",
    other_preconditioner: str | None = None,
    other_options: dict | None = None,
) -> list[dict]:
    """Megatron's param groups (``_get_param_groups``: wd/lr multipliers, decoupled lr, expert-parallel flag), each
    split into its block matrices (``preconditioner``) and the rest (``other_preconditioner``; None: the same).

    Every group carries ``preconditioner``, ``lr = max_lr`` (PISA's reference lr: σ and ρ are given at the
    peak lr and scale by max_lr / lr as Megatron's scheduler moves ``lr``) and ``weight_decay = config.weight_decay
    · wd_mult``; ``adamw`` groups take ``betas`` and ``eps`` from ``config`` unless ``other_options`` sets them.
    """
    from megatron.core.optimizer import _get_param_groups

    check_grouping(preconditioner, other_preconditioner, other_options)
    other_preconditioner = other_preconditioner or preconditioner
    other_options = dict(other_options or {})
    matrices_ids = block_matrices(model_chunks)
    groups = []
    for group in _get_param_groups(model_chunks, config, config_overrides):
        if other_preconditioner == preconditioner and not other_options:
            splits = [(group["params"], preconditioner, {})]
        else:  # both splits even when one is empty here: every rank (every PP stage) must have the same groups
            matrices = [p for p in group["params"] if id(p) in matrices_ids]
            others = [p for p in group["params"] if id(p) not in matrices_ids]
            splits = [(matrices, preconditioner, {}), (others, other_preconditioner, other_options)]
        for params, precond, options in splits:
            new = {
                **group,
                "params": params,
                "preconditioner": precond,
                "lr": group["max_lr"],
                "weight_decay": config.weight_decay * group["wd_mult"],  # until the scheduler sets it
            }
            if precond == "adamw":
                new.update(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
            options = dict(options)
            if "lr" in options:  # Megatron's scheduler sets lr from max_lr/min_lr: move the whole schedule
                lr = options.pop("lr")
                if params and group["max_lr"] != config.lr:
                    raise ValueError(
                        f"pisa_zero.megatron: other_options lr={lr} and a Megatron lr override (max_lr="
                        f"{group['max_lr']}, e.g. decoupled_lr) both set the lr of the same parameters; use one"
                    )
                new.update(lr=lr, max_lr=lr, min_lr=group["min_lr"] * lr / group["max_lr"], default_config=False)
            new.update(options)
            groups.append(new)
    return groups


def check_grouping(preconditioner: str, other_preconditioner: str | None, other_options: dict | None) -> None:
    if preconditioner not in MATRIX_PRECONDITIONERS:
        raise ValueError(
            f"pisa_zero.megatron: invalid preconditioner={preconditioner!r}: expected one of {MATRIX_PRECONDITIONERS}"
        )
    if other_preconditioner is not None and other_preconditioner not in SHARD_PRECONDITIONERS:
        raise ValueError(
            f"pisa_zero.megatron: invalid other_preconditioner={other_preconditioner!r}: embeddings, norms and biases "
            f"take one of {SHARD_PRECONDITIONERS}"
            + (" (nsisa is for the block matrices: preconditioner='nsisa')" if other_preconditioner == "nsisa" else "")
        )
    if preconditioner == "nsisa" and other_preconditioner is None:
        raise ValueError(
            "pisa_zero.megatron: preconditioner='nsisa' needs other_preconditioner for embeddings, norms and biases "
            "(usually 'adamw', the auxiliary AdamW)"
        )
    unknown = sorted(set(other_options or {}) - set(OTHER_OPTION_KEYS))
    if unknown:
        raise ValueError(f"pisa_zero.megatron: other_options has unknown keys {unknown}; expected {OTHER_OPTION_KEYS}")


def group_key(group: dict) -> tuple:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return (*(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys), group["preconditioner"])
