"""How `sparsify info` and the model card read an MoE folder (torch-free): the `layout` record of a
`moe` / `fine-moe` folder, and the active parameters of any native MoE folder, made here or not."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path
from typing import Any

from sparsify.convert.variant import Layout
from sparsify.errors import SparsifyError
from sparsify.families import FAMILIES, Family
from sparsify.option_values import layer_ranges


@dataclass(frozen=True)
class DensePath:
    """Copy 0's G experts, each weighted `weight` (= 1/expert_scale), compute the dense FFN exactly:
    router training routes every token this way to get the teacher from the student's own weights."""

    experts: list[int]
    weight: float


@dataclass(frozen=True)
class MoeLayout(Layout):
    experts: int  # E*G
    copies: int  # E
    granularity: int  # G
    top_k: int
    expert_size: int  # d_ff / G
    dense_d_ff: int
    active_ffn_ratio: float  # FFN compute per token relative to the dense model: K experts of d_ff/G
    split: dict[str, Any]  # {"strategy": contiguous | random, "seed": int}
    router_init: str
    reinit_ratio: float
    family: str = ""
    routing: str = "softmax"  # the router kind (convert/moe/routing.py): softmax, or sigmoid with a selection bias
    architecture: str = ""
    expert_scale: int | None = None
    shared_experts: int = 0  # S of the G partitions form one shared expert
    shared_expert_size: int = 0  # its d_ff: S * d_ff / G
    calibration: dict[str, Any] | None = None  # data, tokens, and per-layer figures of a calibrated split or router
    dense_path: DensePath | None = None
    layers: list[int] | None = None  # the MoE layers where only some are (the others dense FFNs); None: every layer

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MoeLayout:
        layout = super().from_record(record)
        path = record.get("dense_path")
        return layout if not isinstance(path, dict) else replace(layout, dense_path=DensePath(list(path["experts"]), float(path["weight"])))

    def rows(self) -> list[tuple[str, str]]:
        copies = self.copies
        rows = [
            ("experts", f"{self.experts} = {copies} {'copy' if copies == 1 else 'copies'} x granularity {self.granularity}" if not self.shared_experts
                        else f"{self.experts} routed = {copies} {'copy' if copies == 1 else 'copies'} x ({self.granularity} - {self.shared_experts} shared)"),
            ("active experts per token (top-k)", str(self.top_k)),
            ("expert size", f"{self.expert_size} (dense d_ff {self.dense_d_ff})"),
            ("FFN compute per token vs dense", f"{self.active_ffn_ratio:.2f}x" + (" in the MoE layers" if self.layers else "")),
        ]
        if self.layers:
            rows.insert(0, ("MoE layers", f"{layer_ranges(self.layers)} (the others dense)"))
        if self.routing != "softmax":  # softmax is every other target's; only the exception is worth a row
            rows.append(("routing", "sigmoid, per-expert selection bias (loss-free balancing)"))
        if self.shared_experts:
            rows.append(("shared expert", f"{self.shared_expert_size} neurons ({self.shared_experts} of {self.granularity} partitions), every token"))
        if self.granularity > 1:  # with whole copies no neurons are split, and the router is plain random
            rows += [("neuron split", f"{self.split['strategy']} (seed {self.split['seed']})"), ("router init", self.router_init)]
        if self.calibration:
            c = self.calibration
            rows.append(("calibration", f"{c['tokens']:,} tokens of {', '.join(c['data'])}"))
            rows.append(("routed importance kept at step 0", f"{c['mean_routed_share_router']:.1%} by the router, "
                                                             f"{c['mean_routed_share_best']:.1%} at best (mean over layers)"))
        if self.reinit_ratio:
            rows.append(("Drop-Upcycling", f"{self.reinit_ratio:.0%} of the neurons of copies 1..{copies - 1} re-drawn"))
        return rows


LAYOUT = MoeLayout  # the hook `Variant.layout` reads


def moe_family(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if f.moe_model_type == model_type), None)


def _config_int(config: dict[str, Any], keys: tuple[str, ...], folder: Path) -> int:
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    raise SparsifyError(f"{folder}/config.json has none of {', '.join(keys)}: add the value the model was built with")


def _mismatch(match: re.Match, shape: tuple[int, ...], experts: int) -> str | None:
    """Why a tensor named like a routed expert cannot be one of `experts`, or None."""
    if "expert" in match.groupdict():  # one matrix per expert, named by its index
        return None if int(match["expert"]) < experts else f"expert index {match['expert']}"
    return None if shape and shape[0] == experts else f"first dimension {shape[0] if shape else 'none'}"  # fused: stacked on dim 0


def _readable(pattern: str) -> str:
    """A layout regex as a user reads a tensor name: mlp.experts.E.(gate|up|down)_proj.weight."""
    return pattern.replace(r"(?P<expert>\d+)", "E").replace("\\", "")


def _routed_expert_params(shapes: dict[str, tuple[int, ...]], family: Family, experts: int, folder: Path) -> int:
    """Parameters of all routed experts of all layers, in any of the family's expert layouts."""
    layer = re.escape(family.layer_prefix).replace(r"\{layer\}", r"\d+")
    layouts = [re.compile(layer + pattern) for pattern in family.moe_expert_layouts.values()]
    routed = 0
    for name, shape in shapes.items():
        match = next((m for layout in layouts if (m := layout.fullmatch(name))), None)
        if match is None:  # attention, norms, routers, shared experts, dense layers: always active
            continue
        wrong = _mismatch(match, shape, experts)
        if wrong:
            raise SparsifyError(f"{folder}: {name} has {wrong}, but config.json says {experts} experts; "
                                f"the weights do not belong to this config")
        routed += prod(shape)
    if not routed:
        # Counting every expert as active would report a top-k model at dense cost. The layouts listed are
        # the ones transformers 5 loads for this family, so a folder failing here would not load for eval
        # or train either: an error that names what was expected beats a plausible wrong number.
        expected = " or ".join(family.layer_prefix.format(layer="N") + _readable(p) for p in family.moe_expert_layouts.values())
        raise SparsifyError(f"{folder}: config.json describes a {family.moe_model_type} MoE with {experts} experts, but no tensor "
                            f"in its .safetensors files is a routed expert (expected names matching {expected}); "
                            f"re-save the model with transformers' save_pretrained, or check the weights belong to this config")
    return routed


def recognises(config: dict[str, Any]) -> bool:
    """A config.json of a native MoE architecture sparsify converts into (Mixtral, Qwen2-MoE, Qwen3-MoE)."""
    return moe_family(config.get("model_type", "")) is not None


def inactive_parameters(shapes: dict[str, tuple[int, ...]], config: dict[str, Any], folder: Path) -> int:
    """(E - k) / E of every layer's routed experts, E and k read from the config, in any of the
    family's expert layouts (per-expert tensors as written here, or fused as other tools write them)."""
    family = moe_family(config.get("model_type", ""))
    experts = _config_int(config, family.moe_config_keys["experts"], folder)
    top_k = _config_int(config, family.moe_config_keys["top_k"], folder)
    # Summed over layers before dividing: each MoE layer holds all E experts, so the sum is a multiple of E.
    return _routed_expert_params(shapes, family, experts, folder) * (experts - top_k) // experts


# --- how `sparsify eval` shows what the MoE probe saw (eval/report.py calls these) ----------

ROUTING_KIND = "moe"


def routing_rows(summary: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(label, value, format) rows of the report's routing section."""
    return [
        (f"max expert load / mean ({summary['num_experts']} experts, top-{summary['top_k']})", summary["max_imbalance"], ".2f"),
        ("router entropy / log(experts), mean over layers", summary["mean_entropy_normalised"], ".3f"),
    ]


def routing_markdown(summary: dict[str, Any]) -> list[str]:
    lines = ["", "| layer | load max / mean | entropy / log E |", "|---:|---:|---:|"]
    return lines + [f"| {layer['layer']} | {layer['imbalance']:.2f} | {layer['entropy_normalised']:.3f} |" for layer in summary["layers"]]


def routing_plot(summary: dict[str, Any], folder: Path, plt: Any) -> Path:
    """Expert load per layer as a heatmap, relative to a perfectly even split (1.0 everywhere: balanced)."""
    rows = []
    for layer in summary["layers"]:
        total = sum(layer["load"]) or 1
        rows.append([count * len(layer["load"]) / total for count in layer["load"]])
    figure, axis = plt.subplots(figsize=(max(6.0, 0.25 * summary["num_experts"] + 2), max(3.5, 0.22 * len(rows) + 1.5)))
    image = axis.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_xlabel("expert")
    axis.set_ylabel("layer")
    axis.set_yticks(range(len(rows)), [str(layer["layer"]) for layer in summary["layers"]])  # MoE layers only, where some are dense
    axis.set_title(f"tokens per expert / even share\n({summary['tokens']:,} tokens, top-{summary['top_k']} of {summary['num_experts']})",
                   fontsize=10)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    path = folder / "routing_load.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
