"""Layer skipping: a per-token gate before every attention and FFN sublayer of a dense decoder.

Self-contained on purpose: this file is copied next to every saved skip model (auto_map), so the
model loads with `trust_remote_code=True` where sparsify is not installed. It needs only torch and
transformers. It wraps the base family's own decoder (Llama, Mistral, Qwen2, Qwen3): the config
carries the base config's fields unchanged plus the skip fields, and the weights keep the base
names (`model.layers.N...`, `lm_head`), with the gates under `gates.`.

Gate: p = sigmoid(w . x + b) on the sublayer's (normalised) input x; the sublayer runs for a
token when p > threshold. Training sees the same hard decision through a straight-through
estimator: the forward value is exactly 0 or 1, the gradient flows through p. With every gate
open (the initial state: w = 0, b large) the model computes exactly the base model.

KV cache rule for a skipped attention sublayer: the token's keys and values are still computed
and written, so later tokens can attend to it; only its query, attention and output projection
are skipped. Training applies the same rule (full attention, the skipped tokens' outputs dropped),
so cached decoding equals recomputation.

Execution: an FFN runs only on its kept tokens (gathered, computed, scattered back). An attention
sublayer whose tokens are all skipped writes K/V and does nothing else (batch-1 decode); with some
tokens kept, keys and values are computed for all and queries, attention and the output
projection only for the kept ones.
"""

from __future__ import annotations

import inspect
import math
import types

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

SKIP_FIELDS = ("base_model_type", "gate_attention", "gate_ffn", "gated_layers", "skip_threshold", "gate_bias_init", "frozen_gates")
SUBLAYERS = ("attention", "ffn")


# transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache` (the
# old name still works there, with a deprecation warning); 5.17-5.23 know only the old one. sparsify's
# decode engine and tests use these two as well.
def cache_argument(function) -> str:
    """The name `function` (a forward, an output class) gives the KV cache."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def returned_cache(outputs):
    """The cache a forward pass returned, under either name."""
    return outputs.get("cache", outputs.get("past_key_values"))


class SkipConfig(PretrainedConfig):
    model_type = "sparsify_skip"

    def __init__(
        self,
        base_model_type: str = "llama",
        gate_attention: bool = True,
        gate_ffn: bool = True,
        gated_layers: list[int] | None = None,
        skip_threshold: float = 0.5,
        gate_bias_init: float = 6.0,
        frozen_gates: dict[str, bool] | None = None,
        **base_fields,
    ):
        self.base_model_type = base_model_type
        self.gate_attention = gate_attention
        self.gate_ffn = gate_ffn
        self.gated_layers = gated_layers  # None: every layer
        self.skip_threshold = skip_threshold
        self.gate_bias_init = gate_bias_init
        # "layer.sublayer" -> True (always runs) / False (always skipped): gates that barely decide,
        # fixed so that they cost nothing to evaluate (freezing.py)
        self.frozen_gates = frozen_gates
        super().__init__(**base_fields)

    def is_gated(self, layer: int, sublayer: str) -> bool:
        wanted = self.gate_attention if sublayer == "attention" else self.gate_ffn
        return wanted and (self.gated_layers is None or layer in self.gated_layers)


class SkipGate(nn.Module):
    """One sublayer's gate: returns (probability, keep) per token; forward hooks can read both.

    The decision is logit > log(t / (1 - t)), the same as probability > t, in fp32 in training and
    inference alike. Inference takes the fewest operations it can (an fp32 cast, one matrix-vector
    product, one comparison): on small models each extra operation costs more time than the
    sublayer it might skip. There the probability is not computed and is returned as None."""

    def __init__(self, hidden_size: int, bias_init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.bias = nn.Parameter(torch.full((), float(bias_init)))
        self.threshold = 0.5
        self.forced: bool | None = None  # True/False: every token kept/skipped (teacher, tests)

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = float(value)
        self._logit_threshold = math.log(value / (1.0 - value))

    @property
    def logit_threshold(self) -> float:
        """The threshold on the logit w . x + b, log(t / (1 - t)): what the decision compares with
        (kernels that evaluate the gate themselves read it here)."""
        return self._logit_threshold

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        differentiable = self.training or torch.is_grad_enabled()
        if self.forced is not None:
            keep = torch.full(x.shape[:-1], self.forced, dtype=torch.bool, device=x.device)
            return (keep.float() if differentiable else None), (keep.float() if differentiable else keep)
        if torch.is_autocast_enabled(x.device.type):  # autocast would recast the fp32 product to bf16
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x)
        weight, bias = self.weight, self.bias
        if weight.dtype != torch.float32:  # gates are kept in fp32 on load; this is a fallback
            weight, bias = weight.float(), bias.float()
        logit = F.linear(x.float(), weight[None], bias[None]).squeeze(-1)
        keep = logit > self._logit_threshold
        if not differentiable:
            return None, keep
        return torch.sigmoid(logit), keep.float()


def _straight_through(probability: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Exactly `keep` in the forward pass; d/dprobability = 1 in the backward pass."""
    return keep + probability - probability.detach()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _keys_values(attention: nn.Module, hidden: torch.Tensor, position_embeddings, past_key_values):
    """Every token's keys (normalised where the family does, rotated) and values, written to the
    cache; returns the full keys and values to attend over (cached ones included)."""
    shape = (*hidden.shape[:-1], -1, attention.head_dim)
    keys = attention.k_proj(hidden).view(shape)
    if hasattr(attention, "k_norm"):  # Qwen3 normalises keys per head before the rotation
        keys = attention.k_norm(keys)
    values = attention.v_proj(hidden).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    keys = rotate_heads(keys.transpose(1, 2), cos, sin)
    if past_key_values is not None:
        keys, values = past_key_values.update(keys, values, attention.layer_idx)
    return keys, values


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def _attention_for_kept(attention: nn.Module, normed: torch.Tensor, keep: torch.Tensor, attention_mask, position_embeddings,
                        past_key_values) -> torch.Tensor:
    """Attention computed only for the kept tokens' queries; every token's keys and values are
    written (the KV rule). Returns the sublayer output, zero at the skipped tokens."""
    batch, length, hidden = normed.shape
    keys, values = _keys_values(attention, normed, position_embeddings, past_key_values)
    cos, sin = position_embeddings
    total = keys.shape[2]
    kept = keep.bool()
    counts = kept.sum(1)
    width = int(counts.max())
    # Per sequence: the kept positions first, in order; rows past a sequence's count are padding.
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=normed.device)[None, :] < counts[:, None]
    picked = normed.gather(1, order[..., None].expand(-1, -1, hidden))
    queries = attention.q_proj(picked).view(batch, width, -1, attention.head_dim)
    if hasattr(attention, "q_norm"):
        queries = attention.q_norm(queries)
    take = order[..., None].expand(-1, -1, cos.shape[-1])
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)  # positions may be shared by the batch
    queries = rotate_heads(queries.transpose(1, 2), cos.gather(1, take), sin.gather(1, take))
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        rows = attention_mask[:, :1].gather(2, order[:, None, :, None].expand(-1, 1, -1, attention_mask.shape[-1]))
        allowed = rows if rows.dtype == torch.bool else rows == 0
        allowed = allowed[..., -total:]
    else:  # causal by absolute position: a query sees every key up to its own position
        position = order + (total - length)
        allowed = (torch.arange(total, device=normed.device)[None, None, :] <= position[:, :, None])[:, None]
    groups = queries.shape[1] // keys.shape[1]
    if groups > 1:  # (SDPA's enable_gqa would fall back to the math kernel on CUDA with a mask)
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(queries, keys.to(queries.dtype), values.to(queries.dtype), attn_mask=allowed,
                                         scale=attention.scaling)
    out = attention.o_proj(out.transpose(1, 2).reshape(batch, width, -1)) * valid[..., None].to(normed.dtype)
    return torch.zeros_like(normed).scatter(1, order[..., None].expand(-1, -1, hidden), out)


def _consulted(gate: SkipGate | None, training: bool) -> SkipGate | None:
    """The gate to call, or None where the sublayer simply runs (ungated, or frozen open). A frozen
    gate is still called while it is watched (forward hooks: skip-rate probes, the training loss)
    or trained through, so its fixed decision is counted like any other; serving pays nothing."""
    if gate is None or (gate.forced is True and not gate._forward_hooks and not training):
        return None
    return gate


def _gated_ffn(layer: nn.Module, gate: SkipGate | None, normed: torch.Tensor) -> torch.Tensor:
    differentiable = layer.training or torch.is_grad_enabled()
    gate = _consulted(gate, differentiable)
    if gate is None:
        return layer.mlp(normed)
    if gate.forced is False and not differentiable:  # frozen closed: no work, no sync
        if gate._forward_hooks:
            gate(normed)  # watched: its decision is counted
        return torch.zeros_like(normed)
    probability, keep = gate(normed)
    if differentiable:
        return _straight_through(probability, keep).unsqueeze(-1).to(normed.dtype) * layer.mlp(normed)
    kept = keep.reshape(-1)
    count = int(kept.sum())  # the one host synchronisation this sublayer needs to decide
    if count == kept.numel():
        return layer.mlp(normed)
    flat = normed.reshape(-1, normed.shape[-1])
    out = torch.zeros_like(flat)
    if count:
        index = kept.nonzero().squeeze(1)
        out.index_copy_(0, index, layer.mlp(flat.index_select(0, index)))
    return out.view_as(normed)


def _gated_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                         use_cache=False, position_embeddings=None, **kwargs):
    # transformers >= 5.24 passes the cache as `cache`; earlier versions as `past_key_values`.
    past_key_values = kwargs.pop("cache", past_key_values)
    # Frozen-open gates are not evaluated at all; frozen-closed ones decide without a host sync.
    differentiable = self.training or torch.is_grad_enabled()
    attention_gate = _consulted(self.sparsify_gates[0], differentiable)
    residual = hidden_states
    normed = self.input_layernorm(hidden_states)
    run_attention = True
    if attention_gate is not None:
        probability, keep = attention_gate(normed)
        if differentiable:
            count = None
        elif attention_gate.forced is False:
            count = 0
        else:
            count = int(keep.sum())  # one host synchronisation to decide
        if count == 0:
            run_attention = False
            if past_key_values is not None:  # the KV rule: a skipped token stays visible to later ones
                _keys_values(self.self_attn, normed, position_embeddings, past_key_values)
        elif count is not None and count < keep.numel():
            run_attention = False
            hidden_states = residual + _attention_for_kept(
                self.self_attn, normed, keep, attention_mask, position_embeddings, past_key_values
            )
    if run_attention:
        cache = {cache_argument(self.self_attn.forward): past_key_values}
        attended, _ = self.self_attn(
            hidden_states=normed, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
            position_embeddings=position_embeddings, **cache, **kwargs,
        )
        if attention_gate is not None and differentiable:  # (in inference this path means every token kept)
            attended = _straight_through(probability, keep).unsqueeze(-1).to(attended.dtype) * attended
        hidden_states = residual + attended
    residual = hidden_states
    hidden_states = residual + _gated_ffn(self, self.sparsify_gates[1], self.post_attention_layernorm(hidden_states))
    return hidden_states


class SkipPreTrainedModel(PreTrainedModel):
    config_class = SkipConfig
    _keep_in_fp32_modules_strict = ["gates"]  # the decisions stay fp32 even in a bf16 model
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        if isinstance(module, SkipGate):
            module.weight.data.zero_()
            module.bias.data.fill_(self.config.gate_bias_init)
            return
        super()._init_weights(module)


class SkipForCausalLM(SkipPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SkipConfig):
        super().__init__(config)
        # The base family's own decoder, built on this config (it carries every base field).
        base_model_class = getattr(transformers, MODEL_MAPPING_NAMES[config.base_model_type])
        self.model = base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gates = nn.ModuleDict({
            sublayer: nn.ModuleList([
                SkipGate(config.hidden_size, config.gate_bias_init) if config.is_gated(i, sublayer) else nn.Identity()
                for i in range(config.num_hidden_layers)
            ])
            for sublayer in SUBLAYERS
        })
        for i, layer in enumerate(self.model.layers):
            layer.sparsify_gates = tuple(
                g if isinstance(g, SkipGate) else None for g in (self.gates["attention"][i], self.gates["ffn"][i])
            )
            layer.forward = types.MethodType(_gated_layer_forward, layer)
        self.set_skip_threshold(config.skip_threshold)
        self.freeze_gates(config.frozen_gates or {})
        self.post_init()

    def skip_gates(self) -> list[tuple[int, str, SkipGate]]:
        return [(i, sublayer, gate) for sublayer in SUBLAYERS for i, gate in enumerate(self.gates[sublayer]) if isinstance(gate, SkipGate)]

    def set_skip_threshold(self, threshold: float) -> None:
        """Change the inference threshold after training (higher: more skipping)."""
        self.config.skip_threshold = threshold
        for _, _, gate in self.skip_gates():
            gate.threshold = threshold

    def freeze_gates(self, decisions: dict[str, bool]) -> None:
        """Fix gates ("layer.sublayer" -> True: always run, False: always skip); the others decide
        per token again. Stored in the config, so a saved model keeps them."""
        self.config.frozen_gates = dict(decisions) or None
        for layer, sublayer, gate in self.skip_gates():
            gate.forced = decisions.get(f"{layer}.{sublayer}")

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        past_key_values = kwargs.pop("cache", past_key_values)
        cache = {cache_argument(self.model.forward): past_key_values}
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            use_cache=use_cache, **cache, **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits)
        if (cache := returned_cache(outputs)) is not None:
            result[cache_argument(CausalLMOutputWithPast)] = cache
        return result
