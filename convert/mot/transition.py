"""Transition tuning (Antoniak et al., 2024): a trained Mixture-of-Tokens model becomes an ordinary
sparse MoE (Token Choice, per-token top-k, no batch dependence) initialised with its weights, then
trains briefly with the router-training engine (balance and z losses, KL to the dense teacher).

The mapping, per MoT layer: the controller C (d x E) becomes the router (E x d), scaled (below), the experts
copy as they are, and every other tensor passes through. The target is the family's native MoE: Mixtral
(llama, mistral), Qwen2-MoE, Qwen3-MoE. Where only some layers were MoT, the others stay dense FFNs via
the target's `mlp_only_layers` (Qwen2-MoE for llama and mistral, with q/k/v biases off, since Mixtral has
no dense layers).

Scale: a MoT token receives each of the E experts' outputs at about 1/G weight (a softmax over G
tokens), i.e. about E/G = k experts' worth; a Token Choice token receives k experts at renormalised
weights summing to 1. The down projections are multiplied by k so that the first step starts at the
MoT's output scale rather than k times below it (the loss spike at the switch is what remains). That
holds when the k renormalised weights are near-equal, so the router is the controller's direction with
its logits made small: each row is scaled to norm ROUTER_ROW_NORM, which gives logits of std about 0.1
on inputs of unit RMS per dimension, fine-moe's router scale. Dividing by the mixture temperature instead (the first version) made
the router of a low-temperature MoT nearly one-hot, so the top expert got k times its output: on the
H100 run with tau = 0.03 the switch went from perplexity 535 to 4436 and did not recover in 1M tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from sparsify.checkpoint_writer import PlannedTensor
from sparsify.convert.base import ConversionPlan, Exactness, kept_source_tensors, passthrough
from sparsify.convert.moe.describe import MoeLayout
from sparsify.convert.mot.describe import MODEL_TYPE
from sparsify.convert.mot.modeling_mot import MOT_FIELDS
from sparsify.convert.mot.options import TRANSITION_ROUTER_LR, TransitionOptions
from sparsify.errors import SparsifyError
from sparsify.families import FFN_ROLES, Family, family_for
from sparsify.provenance import read_record, source_reference

INIT_FOLDER = "moe-init"  # inside the run folder: the transitioned MoE before its training


# Small on purpose: the chosen experts start near-equal (see the module docstring).
ROUTER_ROW_NORM = 0.1


def router_rows(controller: torch.Tensor) -> torch.Tensor:
    """(E, d) router rows from a controller (d, E): each column's direction, at norm ROUTER_ROW_NORM."""
    columns = controller.float().T
    return columns * (ROUTER_ROW_NORM / columns.norm(dim=1, keepdim=True).clamp_min(1e-12))


@dataclass
class TransitionResult:
    output: Path
    run_dir: Path
    top_k: int
    training: Any = None  # sparsify.train.loop.TrainResult, None with --tokens 0


def target_family(base_model_type: str, every_layer: bool) -> Family:
    """The first softmax-routed native target of the base family that can hold the model: any, when every
    FFN is MoT; one with dense layers (`mlp_only_layers`) otherwise."""
    return family_for(base_model_type, routing="softmax", dense_layers=not every_layer)


def dense_config(mot_config: Any):
    """The base family's config the MoT model wraps (its fields without the MoT ones)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in mot_config.to_dict().items()
              if k not in (*MOT_FIELDS, "model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")}
    return AutoConfig.for_model(mot_config.base_model_type, **fields)


def plan(source: Any, options: TransitionOptions, dtype: torch.dtype) -> ConversionPlan:
    from sparsify.convert.moe.plan import moe_config

    config = source.config
    if config.model_type != MODEL_TYPE:
        raise SparsifyError(f"sparsify transition reads a Mixture-of-Tokens folder (made by `sparsify upcycle --to mot`); "
                            f"this model is '{config.model_type}'")
    options.validate()
    experts, size, group = int(config.mot_experts), int(config.mot_expert_size), int(config.mot_group_size)
    top_k = options.top_k if options.top_k is not None else max(1, experts // group)
    if top_k > experts:
        raise SparsifyError(f"--top-k {top_k} is more than the model's {experts} experts")
    layers, total = list(config.mot_layers), int(config.num_hidden_layers)
    family = target_family(config.base_model_type, layers == list(range(total)))
    dense = dense_config(config)
    d_ff = int(dense.intermediate_size)
    # moe_config reads the layout's experts, top-k, shared width and d_ff / granularity = the expert size.
    shape = SimpleNamespace(experts=experts, top_k=top_k, shared=0, granularity=d_ff // size)
    if d_ff % size:
        raise SparsifyError(f"the MoT experts ({size} neurons) do not divide the dense FFN's {d_ff}; no native target has that expert size")
    try:
        out_config = moe_config(family, dense, shape, dtype)
    except SparsifyError as error:
        if layers == list(range(total)):
            raise
        raise SparsifyError(f"{error} (only some layers are MoT, which needs a target with dense layers; a MoT of every layer, "
                            "--layers all, goes to the family's own MoE)") from error
    if "mlp_only_layers" in out_config:
        out_config["mlp_only_layers"] = [layer for layer in range(total) if layer not in layers]
    hidden = int(config.hidden_size)
    prefix = {layer: family.layer_name(layer, "mlp.") for layer in layers}
    mot_names = {f"{prefix[layer]}{name}" for layer in layers for name in ("gate_proj", "up_proj", "down_proj", "controller.weight")}
    tensors = [passthrough(source.tensors, name, dtype) for name in kept_source_tensors(source) if name not in mot_names]
    shapes = {"gate": (size, hidden), "up": (size, hidden), "down": (hidden, size)}
    current: dict[int, dict[str, torch.Tensor]] = {}  # the layer being written: its three stacks, read once for all E experts

    def expert(layer: int, role: str, index: int) -> torch.Tensor:
        if layer not in current:
            current.clear()
            current[layer] = {name: source.tensors.get(f"{prefix[layer]}{name}_proj").float() for name in FFN_ROLES}
            current[layer]["down"] *= top_k
        return current[layer][role][index].to(dtype).contiguous()

    for layer in layers:
        controller = f"{prefix[layer]}controller.weight"
        tensors.append(PlannedTensor(family.layer_name(layer, family.moe_router), (experts, hidden), dtype,
                                     lambda name=controller: router_rows(source.tensors.get(name)).to(dtype).contiguous()))
        if family.shared_expert is not None:  # a target that always builds one (Qwen2-MoE): width 0, gate 0
            shared = family.shared_expert
            zero = {"gate": (0, hidden), "up": (0, hidden), "down": (hidden, 0)}
            tensors += [PlannedTensor(family.layer_name(layer, shared.tensors[role]), zero[role], dtype,
                                      lambda shape=zero[role]: torch.zeros(shape, dtype=dtype)) for role in FFN_ROLES]
            if shared.gate is not None:
                tensors.append(PlannedTensor(family.layer_name(layer, shared.gate), (1, hidden), dtype, lambda: torch.zeros(1, hidden, dtype=dtype)))
        for index in range(experts):
            for role in FFN_ROLES:
                tensors.append(PlannedTensor(family.layer_name(layer, family.moe_experts[role], expert=index), shapes[role], dtype,
                                             lambda layer=layer, role=role, index=index: expert(layer, role, index)))
    layout = MoeLayout(
        family=family.name, architecture=family.moe_architecture, experts=experts, copies=int(config.mot_copies),
        granularity=experts // int(config.mot_copies), top_k=top_k, expert_size=size, dense_d_ff=d_ff,
        active_ffn_ratio=top_k * size / d_ff, split={"strategy": "mot-slices", "seed": 0}, router_init="mot-controller",
        reinit_ratio=0.0, dense_path=None, layers=None if layers == list(range(total)) else layers,
    )
    exact = Exactness(False, f"Token Choice (top-{top_k} of {experts} per token) in place of the MoT's mixture over {group} "
                             "tokens: transition tuning trains it back")
    return ConversionPlan(out_config, tensors, layout, exact, tags=["moe", "mixture-of-experts", "mixture-of-tokens-transition"])


def dense_teacher(model_dir: Path) -> str:
    """The dense model the MoT folder was converted from (recorded in its sparsify.json)."""
    ref = source_reference(read_record(model_dir))
    if not ref:
        raise SparsifyError(f"{model_dir}/sparsify.json records no source model to learn from; pass --teacher with the dense model")
    return ref


def _made_from(target: Path, model_dir: Path, options: TransitionOptions) -> bool:
    """Whether `target` holds this MoT folder's transition with these options (a resumed run reuses it)."""
    record = read_record(target) if (target / "config.json").exists() else None
    return bool(record) and record.get("options") == asdict(options) and source_reference(record) == str(model_dir)


def transition(model_dir: str | Path, output: str | Path, options: TransitionOptions, training, *, run_dir: str | Path | None = None,
               resume: bool = False, restart: bool = False, command: str | None = None,
               on_status: Callable[[str], None] = lambda text: None, train_callbacks: dict[str, Callable] | None = None) -> TransitionResult:
    """Write the MoT model in `model_dir` as a native MoE and train it (`training`: TrainOptions, or None
    to write it untrained)."""
    from sparsify.atomic_output import check_output_free
    from sparsify.convert.mot import modeling  # noqa: F401 - registers MoTForCausalLM, which open_source reads
    from sparsify.sources import open_source
    from sparsify.train.loop import default_run_dir
    from sparsify.upcycle import resolve_dtype, write_conversion

    model_dir, output = Path(model_dir), Path(output)
    run_dir = Path(run_dir) if run_dir else default_run_dir(output)
    options.validate()
    if training is not None:
        training.validate()
    check_output_free(output, overwrite=False)
    teacher = options.teacher or (dense_teacher(model_dir) if training is not None else "")
    source = open_source(str(model_dir))
    dtype = resolve_dtype("auto", source)
    on_status("writing the native MoE")
    target = output if training is None else run_dir / INIT_FOLDER
    if training is not None and not restart and _made_from(target, model_dir, options):
        on_status(f"reusing the transitioned MoE in {target}")
    else:
        moe_plan = plan(source, options, dtype)
        write_conversion(source, moe_plan, "moe", options, target, dtype, overwrite=training is not None, command=command)
    top_k = json.loads((target / "config.json").read_text())["num_experts_per_tok"]
    if training is None:
        return TransitionResult(output, run_dir, top_k)
    from sparsify.train.loop import train

    training = replace(training, distillation=replace(training.distillation, teacher=teacher))
    if training.optimisation.router_lr is None:  # the library's callers get the command's default too
        training = replace(training, optimisation=replace(training.optimisation, router_lr=TRANSITION_ROUTER_LR))
    trained = train(target, training, output=output, run_dir=run_dir, resume=resume, restart=restart, command=command, **(train_callbacks or {}))
    return TransitionResult(output, run_dir, top_k, trained)
