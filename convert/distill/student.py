"""The dense student: the sparse model's family mapped back to its dense architecture (the family table
of sparsify/families.py read in reverse), its attention, norms and embeddings kept, and each layer's
routed block replaced by the dense FFN an initialisation folds from it (fold.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsify.convert.distill.fold import ExpertGrid, LayerExperts, fold
from sparsify.convert.distill.usage import LayerUsage, routed_blocks
from sparsify.errors import SparsifyError
from sparsify.families import FAMILIES, Family

# MoE config keys that tell apart the dense families one target serves (Qwen2-MoE: llama or qwen2 by
# its q/k/v biases; GLM-4.5-MoE: llama, qwen2 or qwen3 by attention biases and q/k norms).
ATTENTION_KEYS = ("qkv_bias", "use_qk_norm", "attention_bias")
# Not carried from the MoE config to the dense one: identity, dtype and the FFN width, which the fold sets.
NOT_CARRIED = {"architectures", "model_type", "dtype", "torch_dtype", "intermediate_size", "transformers_version"}


def moe_model_types() -> list[str]:
    return sorted({f.moe_model_type for f in FAMILIES})


def expert_count_keys() -> set[str]:
    """The config keys that hold a number of routed experts in the targets we know (and in most MoEs)."""
    return {key for f in FAMILIES for key in f.moe_config_keys.get("experts", ())}


def dense_family(config: dict[str, Any], record: dict[str, Any] | None) -> tuple[Family, str]:
    """(family, dense model_type) of an MoE config: the recorded source's where sparsify made it, else
    the family whose target settings the config has."""
    model_type = config.get("model_type")
    candidates = [f for f in FAMILIES if f.moe_model_type == model_type]
    if not candidates:
        raise SparsifyError(f"no dense architecture is known for '{model_type}'; sparsify distill folds {', '.join(moe_model_types())} "
                            "models (a family is one entry in sparsify/families.py)")
    source_type = ((record or {}).get("source") or {}).get("model_type")
    for family in candidates:
        if source_type in family.dense_model_types:
            return family, source_type
    defaults = _defaults(model_type)

    def matches(family: Family) -> bool:
        return all(config.get(key, defaults.get(key)) == value for key, value in family.moe_config_fixed.items() if key in ATTENTION_KEYS)

    fitting = [f for f in candidates if matches(f)]
    if not fitting:
        raise SparsifyError(f"this {model_type} model's attention settings match none of the dense families that map to it "
                            f"({', '.join(f.name for f in candidates)}); it cannot be folded into one of them exactly")
    return fitting[0], fitting[0].dense_model_types[0]


def _defaults(model_type: str) -> dict[str, Any]:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type).to_dict()


def dense_config(moe_config: dict[str, Any], dense_type: str, d_ff: int, dtype: torch.dtype):
    """The dense model's config: every setting of the MoE config the dense class knows, and the FFN width."""
    from transformers import AutoConfig

    known = set(_defaults(dense_type)) - NOT_CARRIED
    values = {key: value for key, value in moe_config.items() if key in known}
    config = AutoConfig.for_model(dense_type, **values, intermediate_size=d_ff)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.dtype = dtype
    return config


def _ffn_name(family: Family, layer: int, role: str) -> str:
    return family.layer_name(layer, family.dense_ffn[role])


def folded_student(moe: nn.Module, moe_config: dict[str, Any], record: dict[str, Any] | None, usage: list[LayerUsage], init: str,
                   dtype: torch.dtype) -> nn.Module:
    """The dense student `init` folds out of `moe` (a loaded transformers MoE), in `dtype`."""
    from transformers import AutoModelForCausalLM

    family, dense_type = dense_family(moe_config, record)
    blocks = routed_blocks(moe)
    if len(blocks) != int(moe_config["num_hidden_layers"]):
        raise SparsifyError(f"{len(blocks)} of the {moe_config['num_hidden_layers']} layers are routed; sparsify distill folds "
                            "models whose every layer is an MoE layer")
    state = {name: tensor for name, tensor in moe.state_dict().items() if ".mlp." not in name}
    width = None
    for layer, (block, layer_usage) in enumerate(zip(blocks, usage)):
        experts = LayerExperts.of_block(block)
        grid = ExpertGrid.from_layout((record or {}).get("layout"), experts.gate.shape[0])
        ffn = fold(experts, layer_usage, grid, init)
        width = ffn["gate"].shape[0]
        state.update({_ffn_name(family, layer, role): tensor for role, tensor in ffn.items()})
    config = dense_config(moe_config, dense_type, width, dtype)
    # Built on the CPU, not the meta device: non-persistent buffers (RoPE frequencies) are made at construction.
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(student.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise SparsifyError(f"the {dense_type} student does not match the MoE's other weights ({(missing or unexpected)[0]} "
                            f"{'missing' if missing else 'unexpected'}); this MoE's layout is not one sparsify distill knows")
    student.load_state_dict({name: tensor.to(torch.float32) for name, tensor in state.items()})
    student.tie_weights()
    return student.to(dtype).eval()


def check_parent(parent: nn.Module, moe_config: dict[str, Any]) -> None:
    """A parent given for --init parent must have the sparse model's shape outside the FFN."""
    config = parent.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if getattr(config, key, None) != moe_config.get(key):
            raise SparsifyError(f"the parent's {key} is {getattr(config, key, None)}, the sparse model's {moe_config.get(key)}: "
                                "--parent must be the dense model the sparse one was made from")


__all__ = ["check_parent", "dense_config", "dense_family", "expert_count_keys", "folded_student", "moe_model_types"]
