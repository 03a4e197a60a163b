"""Mixture of Tokens (Antoniak et al., NeurIPS 2024): a continuous MoE in the FFNs of a dense decoder.

Self-contained on purpose: this file is copied next to every saved MoT model (auto_map), so the model
loads with `trust_remote_code=True` where sparsify is not installed. It needs only torch and
transformers. It wraps the base family's own decoder (Llama, Mistral, Qwen2, Qwen3): the config carries
the base config's fields plus the MoT fields; the chosen layers' `mlp` is a MoTBlock.

The layer. Tokens are grouped across the batch at one position: sequences g*G .. g*G+G-1 of the batch
form group g at every position t, so token t of a sequence only ever mixes with token t of other
sequences (causality holds). Per group x_1..x_G and expert e (controller C, d x E; temperature tau):

    w[i,e] = softmax over the group's tokens i of (x_i . C[:, e]) / tau
    m_e    = sum_i w[i,e] x_i              one mixed token per expert per group
    o_i    = sum_e w[i,e] Expert_e(m_e)    each token gets the experts' outputs back with its own weights

Every expert is a SwiGLU slice of the dense FFN (or of one of its copies, down projection scaled by
1/copies), so at G = 1 (w = 1) the sum over experts is the dense FFN: the model is its teacher.

Batch dependence (by design, as in the paper): a token's output depends on the other sequences of its
group. Padding never takes mixture weight: tokens the attention mask marks as padding, and the dummy
rows added when the batch is not a multiple of G, get weight 0 (a group with no real token outputs 0).
A batch of one sequence is therefore the dense FFN at any G. Cached generation equals recomputation for
a fixed batch, since groups are the same rows at the same positions either way.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

MOT_FIELDS = ("base_model_type", "mot_layers", "mot_experts", "mot_expert_size", "mot_group_size", "mot_temperature", "mot_copies")


# transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache`.
def cache_argument(function) -> str:
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def returned_cache(outputs):
    return outputs.get("cache", outputs.get("past_key_values"))


class MoTConfig(PretrainedConfig):
    model_type = "sparsify_mot"

    def __init__(
        self,
        base_model_type: str = "llama",
        mot_layers: list[int] | None = None,
        mot_experts: int = 32,
        mot_expert_size: int = 0,
        mot_group_size: int = 8,
        mot_temperature: float = 1.0,
        mot_copies: int = 1,
        **base_fields,
    ):
        self.base_model_type = base_model_type
        self.mot_layers = mot_layers  # None: every layer
        self.mot_experts = mot_experts
        self.mot_expert_size = mot_expert_size  # neurons per expert: intermediate_size * copies / experts
        self.mot_group_size = mot_group_size
        self.mot_temperature = mot_temperature
        self.mot_copies = mot_copies
        super().__init__(**base_fields)

    def is_mot(self, layer: int) -> bool:
        return self.mot_layers is None or layer in self.mot_layers


class MoTController(nn.Module):
    """The controller C (d, E): a module of its own so that training finds it (it trains in full, in
    fp32, like a router) and loading keeps it in fp32."""

    def __init__(self, hidden_size: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, experts))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """Logits (..., E) of tokens (..., d), in fp32 even under autocast: they decide the mixture."""
        with torch.autocast(groups.device.type, enabled=False):
            return groups.float() @ self.weight.float()


class MoTBlock(nn.Module):
    """One MoT FFN: E SwiGLU experts of m neurons (stacked: gate/up (E, m, d), down (E, d, m)) and
    its controller."""

    def __init__(self, hidden_size: int, experts: int, expert_size: int, group_size: int, temperature: float, act_fn):
        super().__init__()
        self.controller = MoTController(hidden_size, experts)
        # The mixture weights pass through this identity, so a forward hook can watch them (eval probes).
        self.mixture = nn.Identity()
        self.gate_proj = nn.Parameter(torch.empty(experts, expert_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(experts, expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden_size, expert_size))
        self.act_fn = act_fn
        self.group_size = group_size
        self.temperature = temperature
        self.token_mask: torch.Tensor | None = None  # (batch, length) bool, True = a real token; set per forward

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every expert on x itself (G = 1): the dense FFN the experts were sliced from."""
        experts, size, hidden = self.gate_proj.shape
        gate, up = self.gate_proj.reshape(experts * size, hidden), self.up_proj.reshape(experts * size, hidden)
        down = self.down_proj.permute(1, 0, 2).reshape(hidden, experts * size)
        return F.linear(self.act_fn(F.linear(x, gate)) * F.linear(x, up), down)

    def mixture_weights(self, groups: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """w (n, S, G, E): per group and expert, a softmax over the group's real tokens (0 at padding)."""
        logits = self.controller(groups) / self.temperature
        logits = logits.masked_fill(~valid[..., None], float("-inf"))
        weights = torch.softmax(logits, dim=2)
        return torch.where(valid[..., None], weights, torch.zeros_like(weights))  # an all-padding group: 0, not NaN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.group_size
        if size == 1:
            return self.dense(x)
        batch, length, hidden = x.shape
        valid = self.token_mask if self.token_mask is not None and self.token_mask.shape == (batch, length) else None
        valid = torch.ones(batch, length, dtype=torch.bool, device=x.device) if valid is None else valid.bool()
        padded = -(-batch // size) * size
        if padded != batch:  # dummy rows, masked: they never take mixture weight
            x = torch.cat([x, x.new_zeros(padded - batch, length, hidden)])
            valid = torch.cat([valid, valid.new_zeros(padded - batch, length)])
        groups = x.view(padded // size, size, length, hidden).transpose(1, 2)  # (n, S, G, d): sequences at one position
        valid = valid.view(padded // size, size, length).transpose(1, 2)  # (n, S, G)
        weights = self.mixture((self.mixture_weights(groups, valid), valid))[0]  # (n, S, G, E); valid (n, S, G)
        mixed = torch.einsum("nsge,nsgd->ensd", weights, groups.float()).to(x.dtype).flatten(1, 2)  # (E, n*S, d)
        hidden_units = self.act_fn(torch.bmm(mixed, self.gate_proj.transpose(1, 2))) * torch.bmm(mixed, self.up_proj.transpose(1, 2))
        outputs = torch.bmm(hidden_units, self.down_proj.transpose(1, 2))  # (E, n*S, d)
        outputs = outputs.view(-1, *groups.shape[:2], hidden)  # (E, n, S, d)
        emitted = torch.einsum("nsge,ensd->nsgd", weights.to(outputs.dtype), outputs)  # (n, S, G, d)
        return emitted.transpose(1, 2).reshape(padded, length, hidden)[:batch]


class MoTPreTrainedModel(PreTrainedModel):
    config_class = MoTConfig
    _keep_in_fp32_modules_strict = ["controller"]
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        if isinstance(module, MoTBlock):  # a fresh model only: conversions write every weight
            std = getattr(self.config, "initializer_range", 0.02)
            for weight in (module.gate_proj, module.up_proj, module.down_proj):
                nn.init.normal_(weight, std=std)
            return
        if isinstance(module, MoTController):
            nn.init.zeros_(module.weight)
            return
        super()._init_weights(module)


class MoTForCausalLM(MoTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        base_model_class = getattr(transformers, MODEL_MAPPING_NAMES[config.base_model_type])
        self.model = base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for i, layer in enumerate(self.model.layers):
            if config.is_mot(i):
                layer.mlp = MoTBlock(config.hidden_size, config.mot_experts, config.mot_expert_size, config.mot_group_size,
                                     config.mot_temperature, layer.mlp.act_fn)
        self.post_init()

    def mot_blocks(self) -> list[MoTBlock]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoTBlock)]

    def set_group_size(self, size: int) -> None:
        """The group size every MoT layer mixes over (1: the dense model); stored in the config."""
        self.config.mot_group_size = int(size)
        for block in self.mot_blocks():
            block.group_size = int(size)

    def set_temperature(self, temperature: float) -> None:
        self.config.mot_temperature = float(temperature)
        for block in self.mot_blocks():
            block.temperature = float(temperature)

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
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        # The mask of this call's tokens (the last `length` columns of a 2-D padding mask): padding takes no mixture weight.
        tokens = attention_mask[:, -length:].bool() if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        for block in self.mot_blocks():
            block.token_mask = tokens
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


__all__ = ["MOT_FIELDS", "MoTBlock", "MoTConfig", "MoTController", "MoTForCausalLM"]
