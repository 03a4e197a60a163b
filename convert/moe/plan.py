"""Plan a native transformers MoE checkpoint (config + tensors) from a dense one and an `ExpertLayout`.

Serves `--to moe` (Sparse Upcycling, Komatsuzaki et al., 2022, with optional Drop-Upcycling,
Nakamura et al., 2025: every expert a full copy of the FFN) and `--to fine-moe` (Krajewski et al.,
2024: each FFN split into G experts of d_ff/G, E copies, top-k scaling with G): the two differ only
in the layout their options ask for (see experts.py for the construction and its exactness).
Every tensor that is not a dense FFN weight passes through unchanged (cast to the output dtype);
each layer's three FFN weights become one router and E*G experts, produced lazily.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from sparsify.checkpoint_writer import PlannedTensor
from sparsify.convert.base import DROPPED_CONFIG_KEYS, ConversionPlan, Progress, kept_source_tensors, no_progress, passthrough
from sparsify.convert.moe.clustering import CalibratedSplit, calibrate_layers
from sparsify.convert.moe.experts import ExpertLayout, LayerExperts
from sparsify.convert.moe.describe import DensePath, MoeLayout
from sparsify.convert.moe.options import FineMoeOptions, MoeOptions
from sparsify.errors import SparsifyError
from sparsify.families import FFN_ROLES, Family, check_representable, family_for
from sparsify.option_values import parse_layers


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
    known |= {key for key in family.extra_config_keys if dense.get(key) is not None}
    config = {k: v for k, v in dense.items() if k in known and not (k in generic and generic[k] == v)}
    size = dense_d_ff(dense_config) // layout.granularity
    moe_values = {"experts": layout.experts, "top_k": layout.top_k, "expert_size": size}
    for logical, keys in family.moe_config_keys.items():
        for key in keys:
            config[key] = moe_values[logical]
    if family.shared_expert is not None:
        config[family.shared_expert.size_key] = layout.shared * (1 if family.shared_expert.size_in_experts else size)
    config.update(family.moe_config_fixed)
    if family.rope_fixed:
        config["rope_parameters"] = {**(config.get("rope_parameters") or {}), **family.rope_fixed}
    config["output_router_logits"] = False
    config["architectures"] = [family.moe_architecture]
    config["model_type"] = family.moe_model_type
    config["dtype"] = str(dtype).removeprefix("torch.")
    return config


def _layer_ffn_names(family: Family, names: set[str], layers: list[int]) -> dict[int, dict[str, str]]:
    found = {}
    for layer in layers:
        roles = {role: family.layer_name(layer, family.dense_ffn[role]) for role in FFN_ROLES}
        missing = [n for n in roles.values() if n not in names]
        if missing:
            raise SparsifyError(f"layer {layer} has no dense FFN weight {missing[0]}; is this a dense {family.name} checkpoint?")
        found[layer] = roles
    return found


def plan_moe_tensors(
    family: Family, source: Any, layout: ExpertLayout, dtype: torch.dtype, calibrated: list[CalibratedSplit | None] | None = None,
    layers: list[int] | None = None,
) -> list[PlannedTensor]:
    """Every tensor of the target: `layers`' FFNs (default every layer) as routers and experts, the rest as they are."""
    reader, config = source.tensors, source.config
    names = reader.names()
    hidden, d_ff = int(config.hidden_size), dense_d_ff(config)
    ffn_names = _layer_ffn_names(family, set(names), list(range(int(config.num_hidden_layers))) if layers is None else layers)
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
            plan.extend(_layer_plan(family, reader, layout, layer, ffn_names[layer], hidden, d_ff, dtype,
                                    calibrated[layer] if calibrated else None))
    return plan


def _layer_plan(
    family: Family, reader: Any, layout: ExpertLayout, layer: int, roles: dict[str, str], hidden: int, d_ff: int, dtype: torch.dtype,
    calibrated: CalibratedSplit | None,
) -> list[PlannedTensor]:
    shared, routing = family.shared_expert, family.routing
    experts = LayerExperts(layout, layer, lambda: {role: reader.get(name) for role, name in roles.items()}, dtype, calibrated,
                           shared.gate_inverse if shared else 1.0)
    size = d_ff // layout.granularity
    shapes = {"gate": (size, hidden), "up": (size, hidden), "down": (hidden, size)}
    router_dtype = torch.float32 if routing.float32 else dtype
    plan = [
        PlannedTensor(
            family.layer_name(layer, family.moe_router),
            (layout.experts, hidden),
            router_dtype,
            lambda: experts.router(hidden).to(router_dtype),
        )
    ]
    if routing.selection_bias is not None:
        # Zero at conversion (it only ever moves load; `sparsify train` balances with it).
        plan.append(PlannedTensor(family.layer_name(layer, routing.selection_bias), (layout.experts,), torch.float32,
                                  lambda: torch.zeros(layout.experts, dtype=torch.float32)))
    if shared is not None:
        width = layout.shared * size
        shared_shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
        plan += [PlannedTensor(family.layer_name(layer, shared.tensors[role]), shared_shapes[role], dtype,
                               lambda role=role: experts.shared_expert(role)) for role in FFN_ROLES]
        if shared.gate is not None:
            # A zero gate is a constant sigmoid(0) = 1/2, cancelled by the shared down projection's factor.
            plan.append(PlannedTensor(family.layer_name(layer, shared.gate), (1, hidden), dtype, lambda: torch.zeros(1, hidden, dtype=dtype)))
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
    return plan


def _then_release(produce, experts: LayerExperts) -> torch.Tensor:
    tensor = produce()
    experts.release()
    return tensor


def layout_record(family: Family, layout: ExpertLayout, d_ff: int, calibration: dict[str, Any] | None = None,
                  refitted: bool = False, layers: list[int] | None = None) -> MoeLayout:
    size = d_ff // layout.granularity
    return MoeLayout(
        family=family.name,
        architecture=family.moe_architecture,
        experts=layout.experts,
        copies=layout.copies,
        granularity=layout.granularity,
        top_k=layout.top_k,
        expert_size=size,
        dense_d_ff=d_ff,
        active_ffn_ratio=layout.active_ffn_ratio,
        split={"strategy": layout.split, "seed": layout.seed},
        router_init=layout.router_init,
        routing=layout.routing,
        reinit_ratio=layout.reinit_ratio,
        expert_scale=layout.expert_scale,
        shared_experts=layout.shared,
        shared_expert_size=layout.shared * size,
        calibration=calibration,
        # Refitted down projections no longer add up to the dense FFN: training then needs the source as its teacher.
        dense_path=None if refitted else DensePath(list(range(layout.routed_per_copy)), 1.0 / layout.expert_scale),
        layers=layers,
    )


def plan(source: Any, options: MoeOptions | FineMoeOptions, dtype: torch.dtype, on_progress: Progress = no_progress) -> ConversionPlan:
    layout = options.layout()
    total = int(source.config.num_hidden_layers)
    layers = parse_layers(options.layers, total)
    every_layer = len(layers) == total
    family = family_for(source.config.model_type, shared_experts=layout.shared > 0, routing=options.routing, dense_layers=not every_layer)
    layout = replace(layout, routing=family.routing.kind)
    d_ff = dense_d_ff(source.config)
    layout.validate(d_ff)
    config = moe_config(family, source.config, layout, dtype)  # refuses what the target cannot represent before calibrating
    if not every_layer:
        config["mlp_only_layers"] = [layer for layer in range(total) if layer not in layers]
    calibrated, calibration = None, None
    # Refit solves for the fitted router's choices, so it needs that router (and one copy, which it models).
    refitted = layout.router_init == "calibrated" and options.refit and layout.copies == 1 and not layout.exactness().exact
    if layout.calibrated:
        calibrated, refusal = calibrate_layers(source, options, layout, on_progress, refit=refitted, layers=layers)
        refitted = refitted and refusal is None
        figures = [split.figures for split in calibrated if split is not None]
        calibration = {**options.record(), "refit": refitted, **({"refit_skipped": refusal} if refusal else {}), "layers": figures,
                       **{f"mean_{key}": sum(f[key] for f in figures) / len(figures) for key in figures[0]}}
    return ConversionPlan(
        config=config,
        tensors=plan_moe_tensors(family, source, layout, dtype, calibrated, layers),
        layout=layout_record(family, layout, d_ff, calibration, refitted, None if every_layer else layers),
        exactness=layout.exactness(),
        tags=["moe", "mixture-of-experts", *options.tags],
    )
