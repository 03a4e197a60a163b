"""`--to mot`: the chosen layers' FFNs become Mixture-of-Tokens layers whose experts are slices of the
dense FFN's neurons (of `copies` copies of it, down projections scaled by 1/copies).

Expert e is slice p of copy c, e = c * (E / copies) + p: the neurons p*m .. (p+1)*m - 1 of the FFN, m =
d_ff * copies / E. Summed over the experts, the slices give back the FFN exactly (the copies' 1/copies
factors add up to 1), which is what the model computes at group size 1. Every other tensor is copied
unchanged under its own name; the architecture is `MoTForCausalLM` with its modeling file written next
to the weights (auto_map).

With `--split coactivation` the slices are of the neurons in a calibrated order (calibrate.py) instead of
in place; any order of the neurons sums to the same FFN.

Controller (d x E, fp32): `--controller-init weights`: column e is the mean of expert e's gate-projection
rows, so x . C[:, e] is the mean pre-activation of the expert's neurons: within a group, the token that
drives the expert's neurons hardest weighs most in its mixture. `--controller-init data`: fitted on
calibration text to rank tokens by the expert's share of their FFN output (calibrate.py). Copies of a slice start alike.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsify.checkpoint_writer import PlannedTensor
from sparsify.convert.base import DROPPED_CONFIG_KEYS, ConversionPlan, Exactness, Progress, kept_source_tensors, no_progress, passthrough
from sparsify.convert.mot.describe import MoTLayout
from sparsify.convert.mot.modeling import remote_code
from sparsify.convert.mot.options import MoTOptions
from sparsify.errors import SparsifyError
from sparsify.families import FFN_ROLES, family_for
from sparsify.option_values import parse_layers

# Families whose decoder the MoT modeling code wraps (SwiGLU FFN under layers.N.mlp, no FFN biases).
MOT_BASES = ("llama", "mistral", "qwen2", "qwen3")


def check_source(config: Any, options: MoTOptions) -> list[int]:
    """The MoT layers, after refusing what this conversion cannot write exactly."""
    if config.model_type not in MOT_BASES:
        raise SparsifyError(f"--to mot supports model types {', '.join(MOT_BASES)}; this model is '{config.model_type}'")
    if getattr(config, "mlp_bias", False):
        raise SparsifyError("this checkpoint's FFN has biases (mlp_bias=True), which MoT experts do not carry")
    options.validate()
    d_ff, experts, copies = int(config.intermediate_size), options.experts, options.copies
    if (d_ff * copies) % experts:
        raise SparsifyError(f"--experts {experts} does not divide the FFN's {d_ff} neurons x --copies {copies} into equal experts; "
                            f"pick a divisor of {d_ff * copies}")
    return parse_layers(options.layers, int(config.num_hidden_layers))


def plan(source: Any, options: MoTOptions, dtype: torch.dtype, on_progress: Progress = no_progress) -> ConversionPlan:
    config = source.config
    layers = check_source(config, options)
    family = family_for(config.model_type)
    d_ff, hidden = int(config.intermediate_size), int(config.hidden_size)
    experts, copies = options.experts, options.copies
    size = d_ff * copies // experts
    per_copy = experts // copies
    names = set(source.tensors.names())
    ffn = {layer: {role: family.layer_name(layer, family.dense_ffn[role]) for role in FFN_ROLES} for layer in layers}
    for layer, by_role in ffn.items():
        if any(name not in names for name in by_role.values()):
            raise SparsifyError(f"layer {layer} has no dense FFN weights named like {by_role['gate']}; is this a dense {family.name} checkpoint?")

    calibrated = {}
    if options.chosen_split == "coactivation" or options.chosen_controller_init == "data":
        from sparsify.convert.mot.calibrate import calibrate_mot

        calibrated = calibrate_mot(source, options, layers, per_copy, on_progress)

    def ordered(layer: int, role: str) -> torch.Tensor:
        """The dense weight in fp32 with its neurons in expert order (calibrated, or as they are)."""
        weight = source.tensors.get(ffn[layer][role]).float()
        if options.chosen_split != "coactivation":
            return weight
        order = calibrated[layer].groups.reshape(-1)
        return weight[:, order] if role == "down" else weight[order]

    def experts_of(layer: int, role: str) -> torch.Tensor:
        """(E, m, d) for gate and up; (E, d, m) for down, scaled by 1/copies."""
        weight = ordered(layer, role)
        if role == "down":
            slices = weight.view(hidden, per_copy, size).permute(1, 0, 2) / copies
        else:
            slices = weight.view(per_copy, size, hidden)
        return slices.repeat(copies, 1, 1).to(dtype).contiguous()

    def controller(layer: int) -> torch.Tensor:
        """(d, E) in fp32; copies of a slice start alike."""
        if options.chosen_controller_init == "data":
            return calibrated[layer].controller.repeat(1, copies).contiguous()
        return ordered(layer, "gate").view(per_copy, size, hidden).mean(dim=1).T.repeat(1, copies).contiguous()

    replaced = {name for by_role in ffn.values() for name in by_role.values()}
    shapes = {"gate": (experts, size, hidden), "up": (experts, size, hidden), "down": (experts, hidden, size)}
    tensors = []
    for name in kept_source_tensors(source):
        if name not in replaced:
            tensors.append(passthrough(source.tensors, name, dtype))
    for layer in layers:
        prefix = family.layer_name(layer, "mlp")
        for role in FFN_ROLES:
            tensors.append(PlannedTensor(f"{prefix}.{role}_proj", shapes[role], dtype, lambda layer=layer, role=role: experts_of(layer, role)))
        tensors.append(PlannedTensor(f"{prefix}.controller.weight", (hidden, experts), torch.float32, lambda layer=layer: controller(layer)))

    base = {k: v for k, v in config.to_dict().items() if k not in DROPPED_CONFIG_KEYS}
    out_config = {
        **base,
        "base_model_type": config.model_type,
        "mot_layers": layers,
        "mot_experts": experts,
        "mot_expert_size": size,
        "mot_group_size": options.group_size,
        "mot_temperature": options.mix_temperature,
        "mot_copies": copies,
        "model_type": "sparsify_mot",
        "architectures": ["MoTForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_mot.MoTConfig", "AutoModelForCausalLM": "modeling_mot.MoTForCausalLM"},
        "dtype": str(dtype).removeprefix("torch."),
    }
    layout = MoTLayout(
        mot_layers=layers, experts=experts, expert_size=size, group_size=options.group_size, copies=copies,
        temperature=options.mix_temperature, controller_init=options.chosen_controller_init, split=options.chosen_split,
        family=config.model_type,
        calibration={**options.record(), "layers": {str(layer): c.figures for layer, c in calibrated.items()}} if calibrated else None,
        # At group size 1 the student computes the dense model: training takes its teacher from its own weights this way.
        dense_path={"group_size": 1},
    )
    exact = (Exactness(True, "group size 1: every expert sees its own token, and the experts sum to the dense FFN")
             if options.group_size == 1 else
             Exactness(False, f"at group size {options.group_size} each expert computes a mixture of {options.group_size} sequences' "
                              f"tokens; the model reproduces the dense one at group size 1 (grow it in training: --grow-group-size)"))
    return ConversionPlan(out_config, tensors, layout, exact, tags=["mixture-of-tokens"], files=remote_code())
