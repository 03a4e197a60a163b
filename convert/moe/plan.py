"""Plan a native transformers MoE checkpoint (config + tensors) from a dense one and an `ExpertLayout`.

Serves `--to moe` (Sparse Upcycling, Komatsuzaki et al., 2022, with optional Drop-Upcycling,
Nakamura et al., 2025: every expert a full copy of the FFN) and `--to fine-moe` (Krajewski et al.,
2024: each FFN split into G experts of d_ff/G, E copies, top-k scaling with G): the two differ only
in the layout their options ask for (see experts.py for the construction and its exactness).
Every tensor that is not a dense FFN weight passes through unchanged (cast to the output dtype);
each layer's three FFN weights become one router and E*G experts, produced lazily.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsify.checkpoint_writer import PlannedTensor
from sparsify.convert.base import DROPPED_CONFIG_KEYS, ConversionPlan, kept_source_tensors, passthrough
from sparsify.convert.moe.experts import ExpertLayout, LayerExperts
from sparsify.convert.moe.describe import DensePath, MoeLayout
from sparsify.convert.moe.options import FineMoeOptions, MoeOptions
from sparsify.errors import SparsifyError
from sparsify.families import FFN_ROLES, Family, check_representable, family_for


def dense_d_ff(config: Any) -> int:
    return int(config.intermediate_size)


def moe_config(family: Family, dense_config: Any, layout: ExpertLayout, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the target: the dense settings it understands plus the MoE settings."""
    from transformers import AutoConfig, PretrainedConfig

    dense = dense_config.to_dict()
    check_representable(family, dense)
    target_defaults = AutoConfig.for_model(family.moe_model_type).to_dict()
    known = set(target_defaults) - DROPPED_CONFIG_KEYS
    # Generic PretrainedConfig attributes (id2label, return_dict, ...) at their defaults are noise.
    generic = PretrainedConfig().to_dict()
    config = {k: v for k, v in dense.items() if k in known and not (k in generic and generic[k] == v)}
    moe_values = {"experts": layout.experts, "top_k": layout.top_k, "expert_size": dense_d_ff(dense_config) // layout.granularity}
    for logical, keys in family.moe_config_keys.items():
        for key in keys:
            config[key] = moe_values[logical]
    config.update(family.moe_config_fixed)
    config["output_router_logits"] = False
    config["architectures"] = [family.moe_architecture]
    config["model_type"] = family.moe_model_type
    config["dtype"] = str(dtype).removeprefix("torch.")
    return config


def _layer_ffn_names(family: Family, names: set[str], layers: int) -> dict[int, dict[str, str]]:
    found = {}
    for layer in range(layers):
        roles = {role: family.layer_name(layer, family.dense_ffn[role]) for role in FFN_ROLES}
        missing = [n for n in roles.values() if n not in names]
        if missing:
            raise SparsifyError(f"layer {layer} has no dense FFN weight {missing[0]}; is this a dense {family.name} checkpoint?")
        found[layer] = roles
    return found


def plan_moe_tensors(
    family: Family, source: Any, layout: ExpertLayout, dtype: torch.dtype
) -> list[PlannedTensor]:
    reader, config = source.tensors, source.config
    names = reader.names()
    hidden, d_ff = int(config.hidden_size), dense_d_ff(config)
    ffn_names = _layer_ffn_names(family, set(names), int(config.num_hidden_layers))
    ffn_to_layer = {name: layer for layer, roles in ffn_names.items() for name in roles.values()}
    plan: list[PlannedTensor] = []
    emitted: set[int] = set()
    for name in kept_source_tensors(source):
        if name not in ffn_to_layer:
            plan.append(passthrough(reader, name, dtype))
            continue
        layer = ffn_to_layer[name]
        if layer not in emitted:  # the layer's MoE block goes where its first FFN tensor was
            emitted.add(layer)
            plan.extend(_layer_plan(family, reader, layout, layer, ffn_names[layer], hidden, d_ff, dtype))
    return plan


def _layer_plan(
    family: Family, reader: Any, layout: ExpertLayout, layer: int, roles: dict[str, str], hidden: int, d_ff: int, dtype: torch.dtype
) -> list[PlannedTensor]:
    experts = LayerExperts(layout, layer, lambda: {role: reader.get(name) for role, name in roles.items()}, dtype)
    size = d_ff // layout.granularity
    shapes = {"gate": (size, hidden), "up": (size, hidden), "down": (hidden, size)}
    plan = [
        PlannedTensor(
            family.layer_name(layer, family.moe_router),
            (layout.experts, hidden),
            dtype,
            lambda: experts.router(hidden),
        )
    ]
    for expert in range(layout.experts):
        for role in FFN_ROLES:
            plan.append(
                PlannedTensor(
                    family.layer_name(layer, family.moe_experts[role], expert=expert),
                    shapes[role],
                    dtype,
                    lambda expert=expert, role=role: experts.expert(expert, role),
                )
            )
    # Free this layer's dense FFN once its last expert tensor has been produced.
    last = plan[-1]
    plan[-1] = PlannedTensor(last.name, last.shape, last.dtype, lambda: _then_release(last.produce, experts))
    for name, (shape, fill) in family.moe_extra_tensors.items():
        concrete = tuple(hidden if s == "hidden" else s for s in shape)
        plan.append(PlannedTensor(family.layer_name(layer, name), concrete, dtype, lambda c=concrete, f=fill: torch.full(c, f, dtype=dtype)))
    return plan


def _then_release(produce, experts: LayerExperts) -> torch.Tensor:
    tensor = produce()
    experts.release()
    return tensor


def layout_record(family: Family, layout: ExpertLayout, d_ff: int) -> MoeLayout:
    return MoeLayout(
        family=family.name,
        architecture=family.moe_architecture,
        experts=layout.experts,
        copies=layout.copies,
        granularity=layout.granularity,
        top_k=layout.top_k,
        expert_size=d_ff // layout.granularity,
        dense_d_ff=d_ff,
        active_ffn_ratio=layout.top_k / layout.granularity,
        split={"strategy": layout.split, "seed": layout.seed},
        router_init=layout.router_init,
        reinit_ratio=layout.reinit_ratio,
        expert_scale=layout.expert_scale,
        dense_path=DensePath(list(range(layout.granularity)), 1.0 / layout.expert_scale),
    )


def plan(source: Any, options: MoeOptions | FineMoeOptions, dtype: torch.dtype) -> ConversionPlan:
    layout = options.layout()
    family = family_for(source.config.model_type)
    d_ff = dense_d_ff(source.config)
    layout.validate(d_ff)
    return ConversionPlan(
        config=moe_config(family, source.config, layout, dtype),
        tensors=plan_moe_tensors(family, source, layout, dtype),
        layout=layout_record(family, layout, d_ff),
        exactness=layout.exactness(),
        tags=["moe", "mixture-of-experts", *options.tags],
    )
