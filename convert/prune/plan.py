"""Plan a pruned dense checkpoint: the source's architecture with each FFN cut to its most
important neurons (for every token: the static baseline of routed experts).

Importance of neuron n: with calibration text, its mean contribution E|h_n(x)| |down_n| (the same
statistic fine-moe's shared experts and clustering use; the model runs layer by layer, each layer
on the pruned layers before it, and with --refit the kept neurons' down projection is re-solved to
reproduce the dense FFN's output); without, the weights alone, |gate_n| |up_n| |down_n|.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsify.checkpoint_writer import PlannedTensor
from sparsify.convert.base import ConversionPlan, Exactness, Progress, kept_source_tensors, no_progress, passthrough
from sparsify.convert.calibration.neurons import mean_importance, neuron_outputs
from sparsify.convert.calibration.spill import TensorSpill
from sparsify.convert.moe.refit import refit_down, refit_refusal
from sparsify.convert.prune.describe import PruneLayout
from sparsify.convert.prune.options import PruneOptions
from sparsify.errors import SparsifyError
from sparsify.families import FFN_ROLES, family_for

_DROPPED = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}


def pruned_config(config: Any, kept: int, dtype: torch.dtype) -> dict[str, Any]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = {k: v for k, v in config.to_dict().items() if k not in _DROPPED}
    out["intermediate_size"] = kept
    out["architectures"] = out.get("architectures") or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def _calibrated(source: Any, options: PruneOptions, kept: int, on_progress: Progress) -> tuple[list[tuple[torch.Tensor, Any]], str | None]:
    """Per layer: (kept neuron indices, spilled refitted down or None), the model pruned layer by layer;
    and why the down projections were not refitted although asked, or None."""
    from sparsify.convert.calibration.runner import calibration_blocks, layer_activity

    blocks = calibration_blocks(source, options)
    refusal = refit_refusal(blocks.numel(), kept) if options.refit else None
    refit = options.refit and refusal is None and kept < int(source.config.intermediate_size)  # nothing to repair when all stay
    spill = TensorSpill() if refit else None
    layers = []
    on_progress("calibrating", 0, int(source.config.num_hidden_layers))
    for activity in layer_activity(source, blocks, on_layer=lambda done, total: on_progress("calibrating", done, total)):
        x, ffn = activity.ffn_input, activity.ffn
        index = mean_importance(x, ffn).topk(kept).indices.sort().values
        part = {"gate": ffn["gate"][index], "up": ffn["up"][index], "down": ffn["down"][:, index]}
        down = part["down"]
        if refit:
            down = refit_down(x, ffn, part["down"], lambda chunk: next(neuron_outputs(chunk, part, chunk=len(chunk))))
        activity.converted_ffn = lambda inputs, part=part, down=down: torch.cat([h @ down.T for h in neuron_outputs(inputs, part)])
        layers.append((index.cpu(), spill.put(f"down-{activity.layer}", down) if spill else None))
    return [(index, (spill, path)) for index, path in layers], refusal


def plan(source: Any, options: PruneOptions, dtype: torch.dtype, on_progress: Progress = no_progress) -> ConversionPlan:
    config = source.config
    family = family_for(config.model_type)
    if getattr(config, "mlp_bias", False):
        raise SparsifyError("this checkpoint's FFN has biases (mlp_bias=True), which --to prune does not cut yet; it would write a broken model")
    d_ff = int(config.intermediate_size)
    kept = max(1, round(options.keep * d_ff))
    layers = int(config.num_hidden_layers)
    names = set(source.tensors.names())
    roles = {layer: {role: family.layer_name(layer, family.dense_ffn[role]) for role in FFN_ROLES} for layer in range(layers)}
    for layer, by_role in roles.items():
        if any(name not in names for name in by_role.values()):
            raise SparsifyError(f"layer {layer} has no dense FFN weights named like {by_role['gate']}; is this a dense {family.name} checkpoint?")
    calibrated, refusal = _calibrated(source, options, kept, on_progress) if options.calibrated else (None, None)
    chosen: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def layer_choice(layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if layer not in chosen:
            if calibrated is not None:
                index, (spill, path) = calibrated[layer]
                chosen[layer] = (index, spill.get(path) if path is not None else None)
            else:
                w = {role: source.tensors.get(name).float() for role, name in roles[layer].items()}
                score = w["gate"].norm(dim=1) * w["up"].norm(dim=1) * w["down"].norm(dim=0)
                chosen[layer] = (score.topk(kept).indices.sort().values, None)
        return chosen[layer]

    def produce(layer: int, role: str, name: str) -> torch.Tensor:
        index, down = layer_choice(layer)
        if role == "down":
            return (down if down is not None else source.tensors.get(name)[:, index]).to(dtype).contiguous()
        return source.tensors.get(name)[index].to(dtype).contiguous()

    ffn_names = {name: (layer, role) for layer, by_role in roles.items() for role, name in by_role.items()}
    hidden = int(config.hidden_size)
    shapes = {"gate": (kept, hidden), "up": (kept, hidden), "down": (hidden, kept)}
    tensors = []
    for name in kept_source_tensors(source):
        if name in ffn_names:
            layer, role = ffn_names[name]
            tensors.append(PlannedTensor(name, shapes[role], dtype, lambda layer=layer, role=role, name=name: produce(layer, role, name)))
        else:
            tensors.append(passthrough(source.tensors, name, dtype))
    record = None
    if calibrated is not None:
        record = {**options.record(), "refit": options.refit and refusal is None and kept < d_ff, **({"refit_skipped": refusal} if refusal else {})}
    out_config = pruned_config(config, kept, dtype)
    return ConversionPlan(
        config=out_config,
        tensors=tensors,
        layout=PruneLayout(architecture=out_config["architectures"][0], dense_d_ff=d_ff, kept_d_ff=kept,
                           importance="calibration" if calibrated is not None else "weights", calibration=record),
        exactness=Exactness(kept == d_ff, f"{d_ff - kept} of {d_ff} FFN neurons removed for every token" if kept < d_ff else "nothing removed"),
        tags=["pruned", *options.tags],
    )
