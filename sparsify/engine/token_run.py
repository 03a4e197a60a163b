"""One decoder layer over T consecutive tokens per sequence on the static cache: what a speculative
verification runs for each of the teacher's layers, and a draft head for its own layer.

Token t of every sequence sits at slot slots[t] (consecutive) and attends causally over the cache up
to its slot; its keys and values are written there. On a GPU in a half dtype the layer runs the decode
step's fused kernels (sparsify/engine/fused_sublayers.py), which read the rotary tables and the
position themselves; elsewhere the generic path (the modules, SDPA under a mask) needs the tables'
rows and the mask, built once per pass by `TokenRows.at`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.convert.skip.modeling_skip import rotate_heads
from sparsify.engine import attention_kernels, fused_sublayers

# Up to this many rows (batch x tokens) the input norm and q/k/v projections are one launch; above,
# the norm kernel and cuBLAS.
FUSED_ROWS = 8


@dataclass
class TokenRows:
    slots: torch.Tensor  # (T,) consecutive cache slots
    cos: torch.Tensor | None = None  # (1, T, d) rotary rows, for the generic path only
    sin: torch.Tensor | None = None
    visible: torch.Tensor | None = None  # (1, 1, T, max_len): causal over the cache, for SDPA only

    @classmethod
    def at(cls, engine, slots: torch.Tensor, generic: bool) -> "TokenRows":
        """`generic`: some layer of the pass runs the generic path or SDPA, so build its rows (no
        kernels spent otherwise)."""
        if not generic:
            return cls(slots)
        cos, sin = engine.cos_table.index_select(0, slots)[None], engine.sin_table.index_select(0, slots)[None]
        return cls(slots, cos, sin, (engine.slots[None, :] <= slots[:, None])[None, None])


def run_layer(engine, block: nn.Module, fused_attention: bool, fused_mlp: bool, hidden: torch.Tensor, rows: TokenRows,
              key_cache: torch.Tensor, value_cache: torch.Tensor, scratch: attention_kernels.AttentionScratch | None) -> None:
    """hidden (B, T, H) += the layer's attention, then its dense FFN, writing K/V at rows.slots.
    `scratch` (made for T tokens) runs the attention as the decode kernel where fused; None: SDPA."""
    attention = block.self_attn
    if fused_attention:
        fused_sublayers.attend(attention, block.input_layernorm, hidden, rows.slots[:1], engine.cos_table, engine.sin_table,
                               key_cache, value_cache, rows.visible, engine._norm, scratch, fused_rows=FUSED_ROWS)
    else:
        batch, width = hidden.shape[:2]
        normed = engine._norm(block.input_layernorm, hidden)
        shape = (batch, width, -1, attention.head_dim)
        queries, keys = attention.q_proj(normed).view(shape), attention.k_proj(normed).view(shape)
        if hasattr(attention, "q_norm"):
            queries, keys = attention.q_norm(queries), attention.k_norm(keys)
        key_cache.index_copy_(2, rows.slots, rotate_heads(keys.transpose(1, 2), rows.cos, rows.sin))
        value_cache.index_copy_(2, rows.slots, attention.v_proj(normed).view(shape).transpose(1, 2))
        queries = rotate_heads(queries.transpose(1, 2), rows.cos, rows.sin)
        out = F.scaled_dot_product_attention(queries, key_cache, value_cache, attn_mask=rows.visible, scale=attention.scaling,
                                             enable_gqa=True)
        hidden.add_(attention.o_proj(out.transpose(1, 2).reshape(batch, width, -1)))
    normed = engine._norm(block.post_attention_layernorm, hidden)
    if fused_mlp:
        fused_sublayers.dense_ffn(block.mlp, normed, hidden)
    else:
        hidden.add_(block.mlp(normed))
