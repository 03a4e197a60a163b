"""Model families as data: where a dense family keeps its FFN, and which native MoE it maps to.

Adding a family is adding one `Family` entry to `FAMILIES`. Tensor names are templates relative to
a decoder layer's prefix; `{expert}` is the expert index in the MoE target.

The MoE tensors are written in each target's classic per-expert layout (for Mixtral
`block_sparse_moe.experts.{e}.w1.weight`), which every engine reads: transformers 4.x directly,
transformers 5.x through its load-time conversion to fused expert tensors, vLLM and llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparsify.errors import SparsifyError

# The three SwiGLU projections, by role: out = down(act(gate(x)) * up(x)).
FFN_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class SharedExpert:
    """Where a target keeps its shared expert (one SwiGLU FFN every token computes, beside the routed
    ones) and the fixed gate in front of it, if any. A gate's weight is written as zeros, so the gate is
    a constant (sigmoid(0) = 1/2 for Qwen2-MoE) and the shared expert's down projection is multiplied
    by `gate_inverse` to cancel it: the conversion stays exact."""

    tensors: dict[str, str]  # role -> name template relative to a layer's prefix
    size_key: str  # config key of the shared expert's size
    gate: str | None = None  # the gate's weight, shape (1, hidden); None: the shared expert is added as it is
    gate_inverse: float = 1.0
    size_in_experts: bool = False  # size_key counts routed-expert widths (GLM's n_shared_experts), not neurons


@dataclass(frozen=True)
class Routing:
    """How a target's router turns logits into expert choices and weights (convert/moe/routing.py does the math).

    softmax: weights are the softmax of the logits over the chosen top-k (renormalised).
    sigmoid: scores are sigmoid(logits); experts are chosen by score + a per-expert selection bias that
    only moves load (DeepSeek-V3's auxiliary-loss-free balancing, which `sparsify train` updates), and
    weighted by their scores renormalised over the top-k."""

    kind: str = "softmax"
    selection_bias: str | None = None  # name template of the bias tensor, relative to a layer's prefix
    float32: bool = False  # the target keeps its router weights in fp32 whatever the model's dtype


SOFTMAX = Routing()


QWEN2_MOE_SHARED = SharedExpert(
    tensors={"gate": "mlp.shared_expert.gate_proj.weight", "up": "mlp.shared_expert.up_proj.weight",
             "down": "mlp.shared_expert.down_proj.weight"},
    size_key="shared_expert_intermediate_size",
    gate="mlp.shared_expert_gate.weight",
    gate_inverse=2.0,
)

# GLM-4.5's MoE (Glm4MoeForCausalLM): Llama attention with optional q/k norms (Qwen3's) and q/k/v
# biases (Qwen2's), a plain shared expert, and a sigmoid router with a per-expert selection bias. It is
# the one native target with a selection bias whose attention can be any of our dense families'.
GLM4_MOE_SHARED = SharedExpert(
    tensors={"gate": "mlp.shared_experts.gate_proj.weight", "up": "mlp.shared_experts.up_proj.weight",
             "down": "mlp.shared_experts.down_proj.weight"},
    size_key="n_shared_experts",
    size_in_experts=True,
)
GLM4_MOE_ROUTING = Routing(kind="sigmoid", selection_bias="mlp.gate.e_score_correction_bias", float32=True)
GLM4_MOE_KEYS = {"experts": ("n_routed_experts",), "top_k": ("num_experts_per_tok",), "expert_size": ("moe_intermediate_size",)}
# Every layer an MoE layer, one expert group, weights renormalised and unscaled (what makes the
# conversion exact, as with softmax: see convert/moe/experts.py), full-width RoPE (GLM's default rotates
# half of each head), and no multi-token-prediction layer, which we have no weights for.
# GLM's config defaults partial_rotary_factor to 0.5 when it is missing; transformers 5 reads it from
# rope_parameters, and older readers from the top level, so it is written in both places.
GLM4_MOE_ROPE = {"partial_rotary_factor": 1.0}
GLM4_MOE_FIXED = {"first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
                  "routed_scaling_factor": 1.0, "num_nextn_predict_layers": 0, **GLM4_MOE_ROPE}
# What every dense family's GLM-4.5-MoE target shares; each entry adds its attention settings.
GLM4_MOE_TARGET = dict(moe_model_type="glm4_moe", moe_architecture="Glm4MoeForCausalLM", moe_config_keys=GLM4_MOE_KEYS,
                       shared_expert=GLM4_MOE_SHARED, extra_config_keys=("head_dim",), routing=GLM4_MOE_ROUTING,
                       rope_fixed=GLM4_MOE_ROPE)

# What every Qwen2-MoE target writes (the qwen2 family's, and llama/mistral's with shared experts).
QWEN2_MOE_KEYS = {"experts": ("num_experts",), "top_k": ("num_experts_per_tok",), "expert_size": ("moe_intermediate_size",)}
QWEN2_MOE_ROUTING = {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}


@dataclass(frozen=True)
class Family:
    name: str
    dense_model_types: tuple[str, ...]
    moe_model_type: str
    moe_architecture: str
    layer_prefix: str = "model.layers.{layer}."
    dense_ffn: dict[str, str] = field(
        default_factory=lambda: {
            "gate": "mlp.gate_proj.weight",
            "up": "mlp.up_proj.weight",
            "down": "mlp.down_proj.weight",
        }
    )
    moe_router: str = "mlp.gate.weight"
    moe_experts: dict[str, str] = field(
        default_factory=lambda: {
            "gate": "mlp.experts.{expert}.gate_proj.weight",
            "up": "mlp.experts.{expert}.up_proj.weight",
            "down": "mlp.experts.{expert}.down_proj.weight",
        }
    )
    # Regexes, relative to a layer's prefix, of the routed experts' tensors in each layout transformers 5
    # loads: one matrix per expert (the classic layout: ours, and what save_pretrained writes), or one
    # 3-D tensor per projection whose first dimension is the expert (what transformers 5 modules hold,
    # so what tools saving a state_dict write). `sparsify info` counts active parameters from these.
    moe_expert_layouts: dict[str, str] = field(
        default_factory=lambda: {
            "per-expert": r"mlp\.experts\.(?P<expert>\d+)\.(gate|up|down)_proj\.weight",
            "fused": r"mlp\.experts\.(gate_up|down)_proj",
        }
    )
    # Config keys of the MoE target for: number of experts, active experts, per-expert d_ff.
    # Several keys for one value are all written, so older and newer readers both find it.
    moe_config_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Values the target needs so that routing matches our construction (see convert/experts.py).
    moe_config_fixed: dict[str, Any] = field(default_factory=dict)
    # Dense config values the target architecture cannot represent: key -> the value we need.
    requires: dict[str, Any] = field(default_factory=dict)
    # The target's shared expert, if it has one; `--shared-experts` needs it. A family whose target has none
    # may have a second entry, listed after it, that maps the same dense types to a target that does.
    shared_expert: SharedExpert | None = None
    # Dense config keys the target reads although its config class does not declare them (e.g. head_dim).
    extra_config_keys: tuple[str, ...] = ()
    routing: Routing = SOFTMAX
    # Values merged into the target's rope_parameters (transformers 5 keeps e.g. partial_rotary_factor there).
    rope_fixed: dict[str, Any] = field(default_factory=dict)

    def layer_name(self, layer: int, template: str, **fmt: int) -> str:
        return self.layer_prefix.format(layer=layer) + template.format(**fmt)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        # SmolLM and most "Llama-family" checkpoints use model_type "llama".
        dense_model_types=("llama", "mistral"),
        moe_model_type="mixtral",
        moe_architecture="MixtralForCausalLM",
        moe_router="block_sparse_moe.gate.weight",
        moe_experts={
            "gate": "block_sparse_moe.experts.{expert}.w1.weight",
            "up": "block_sparse_moe.experts.{expert}.w3.weight",
            "down": "block_sparse_moe.experts.{expert}.w2.weight",
        },
        # transformers 5 renames Mixtral's block_sparse_moe to mlp on load, so either prefix is read.
        moe_expert_layouts={
            "per-expert": r"(block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\.w[123]\.weight",
            "fused": r"(block_sparse_moe|mlp)\.experts\.(gate_up|down)_proj",
        },
        moe_config_keys={
            "experts": ("num_local_experts",),
            "top_k": ("num_experts_per_tok",),
            "expert_size": ("intermediate_size",),
        },
        moe_config_fixed={"router_jitter_noise": 0.0},
        requires={"attention_bias": False, "mlp_bias": False},
    ),
    Family(
        name="qwen2",
        dense_model_types=("qwen2",),
        moe_model_type="qwen2_moe",
        moe_architecture="Qwen2MoeForCausalLM",
        moe_config_keys=QWEN2_MOE_KEYS,
        # Qwen2-MoE always builds a shared expert; without --shared-experts it has size 0 and computes nothing.
        moe_config_fixed={**QWEN2_MOE_ROUTING, "qkv_bias": True},
        shared_expert=QWEN2_MOE_SHARED,
    ),
    Family(
        name="qwen3",
        dense_model_types=("qwen3",),
        moe_model_type="qwen3_moe",
        moe_architecture="Qwen3MoeForCausalLM",
        moe_config_keys={
            # transformers >= 5.2x calls it num_local_experts; older readers and vLLM num_experts.
            "experts": ("num_experts", "num_local_experts"),
            "top_k": ("num_experts_per_tok",),
            "expert_size": ("moe_intermediate_size",),
        },
        moe_config_fixed={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    ),
    Family(
        name="llama+shared",
        # Mixtral has no shared expert: with --shared-experts, llama and mistral go to Qwen2-MoE, whose
        # attention is Llama's when its q/k/v biases are off.
        dense_model_types=("llama", "mistral"),
        moe_model_type="qwen2_moe",
        moe_architecture="Qwen2MoeForCausalLM",
        moe_config_keys=QWEN2_MOE_KEYS,
        moe_config_fixed={**QWEN2_MOE_ROUTING, "qkv_bias": False, "use_sliding_window": False},
        requires={"attention_bias": False, "mlp_bias": False, "sliding_window": None},
        shared_expert=QWEN2_MOE_SHARED,
        extra_config_keys=("head_dim",),
    ),
    # Sigmoid routing with a selection bias (--routing sigmoid): GLM-4.5-MoE for every family. Listed
    # last, so that softmax stays the default wherever a softmax target exists.
    Family(
        name="llama+sigmoid",
        dense_model_types=("llama", "mistral"),
        moe_config_fixed={**GLM4_MOE_FIXED, "use_qk_norm": False},
        # GLM's o_proj never has a bias, and it has no sliding window.
        requires={"attention_bias": False, "mlp_bias": False, "sliding_window": None},
        **GLM4_MOE_TARGET,
    ),
    Family(
        name="qwen2+sigmoid",
        dense_model_types=("qwen2",),
        # Qwen2 has biases on q, k and v and none on o: GLM's attention_bias=True exactly.
        moe_config_fixed={**GLM4_MOE_FIXED, "use_qk_norm": False, "attention_bias": True},
        requires={"use_sliding_window": False},
        **GLM4_MOE_TARGET,
    ),
    Family(
        name="qwen3+sigmoid",
        # Qwen3-MoE has no shared expert: with --shared-experts, qwen3 comes here (GLM's use_qk_norm is
        # Qwen3's per-head RMSNorm on q and k before RoPE).
        dense_model_types=("qwen3",),
        moe_config_fixed={**GLM4_MOE_FIXED, "use_qk_norm": True},
        requires={"attention_bias": False, "use_sliding_window": False},
        **GLM4_MOE_TARGET,
    ),
)

ROUTING_KINDS = ("softmax", "sigmoid")


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.dense_model_types)


def holds_dense_layers(family: Family) -> bool:
    """Whether the target can keep some layers as dense FFNs (Qwen2-MoE's and Qwen3-MoE's `mlp_only_layers`)."""
    return "mlp_only_layers" in family.moe_config_fixed


def family_for(model_type: str, shared_experts: bool = False, routing: str | None = None, dense_layers: bool = False) -> Family:
    """The first family that converts `model_type`; with `shared_experts`, the first whose target has one;
    with `routing`, the first whose router works that way; with `dense_layers`, the first whose target can
    keep some layers dense."""
    families = [family for family in FAMILIES if model_type in family.dense_model_types]
    if not families:
        raise SparsifyError(
            f"architecture '{model_type}' is not supported yet; supported dense model types: "
            f"{', '.join(supported_model_types())}. Adding one is a single entry in sparsify/families.py."
        )
    if routing is not None and routing not in ROUTING_KINDS:
        raise SparsifyError(f"--routing must be one of {', '.join(ROUTING_KINDS)}, got '{routing}'")
    wanted = [f for f in families if (routing is None or f.routing.kind == routing) and (not shared_experts or f.shared_expert)]
    fitting = [f for f in wanted if not dense_layers or holds_dense_layers(f)]
    if fitting:
        return fitting[0]
    if wanted:  # only the dense layers are missing
        raise SparsifyError(f"{wanted[0].moe_architecture}, the target of {model_type} with these options, makes every layer an MoE; "
                            "converting only some layers needs a target with dense layers (softmax routing: drop --routing sigmoid), "
                            "or use --layers all")
    if routing is not None and shared_experts:
        others = sorted({f.routing.kind for f in families if f.shared_expert} - {routing})
        hint = f"use --routing {others[0]}" if others else "use --shared-experts 0"
        raise SparsifyError(f"no native target of {model_type} has a shared expert and {routing} routing; {hint}")
    raise SparsifyError(f"{families[0].moe_architecture}, the target of {model_type}, has no shared expert, and no other "
                        "native target for it does yet; use --shared-experts 0")


def check_representable(family: Family, dense_config: dict[str, Any]) -> None:
    """Refuse dense configs whose features the MoE target would silently drop."""
    for key, needed in family.requires.items():
        value = dense_config.get(key, needed)
        if value != needed:
            raise SparsifyError(
                f"this {family.name} checkpoint has {key}={value!r}, which {family.moe_architecture} "
                f"cannot represent ({key}={needed!r} is required); converting it would change the model."
            )
