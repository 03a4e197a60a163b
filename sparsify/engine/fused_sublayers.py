"""The decode step's ungated attention and dense FFN sublayers with fewer kernels, on a GPU.

Same modules, same weights, no copies: the projections read the model's own linears' weights
(cuBLAS, or one Triton launch for q/k/v at batch 1-2), and what lies between them is fused
(sparsify/engine/attention_kernels.py):

    attention   norm and q/k/v projections (at one or two rows, or up to 8 in a speculative
                verification, one matrix-vector launch for the norm and all three; above, the norm
                kernel and cuBLAS), rope_and_cache (q/k norms, rotary embedding, cache writes: one
                kernel for ~12), attention over the cache (a decode kernel at one or two sequences,
                each with one token or a verification's k + 1; SDPA above), o_proj with the
                residual add folded into the GEMM (addmm_, beta = 1)
    dense FFN   norm, gate and up projections, silu_mul (one kernel for two), down_proj with the
                residual add folded into the GEMM

Dense teachers and MoE students both decode through this, so their ratio compares FFNs rather
than launch overheads the two share. The one numerical difference from the model's own forward:
the residual add of o_proj and down_proj happens before the projection's output is rounded to
the activations' dtype (one rounding instead of two).

Gated sublayers (skip models) keep the engine's generic path: their q projection and body kernels
must stay inside the IF node.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.engine import attention_kernels
from sparsify.engine.decode_kernels import fusable_norm


def attention_fusable(attention: nn.Module, dtype: torch.dtype) -> bool:
    projections = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    norms = [getattr(attention, name, None) for name in ("q_norm", "k_norm")]
    norms_ok = all(n is None for n in norms) or all(n is not None and fusable_norm(n, dtype) for n in norms)
    return all(isinstance(p, nn.Linear) for p in projections) and norms_ok and attention.head_dim % 2 == 0


def mlp_fusable(mlp: nn.Module) -> bool:
    linears = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(m, nn.Linear) and m.bias is None for m in linears) and "SiLU" in type(getattr(mlp, "act_fn", None)).__name__


def _add_projection(hidden: torch.Tensor, x: torch.Tensor, projection: nn.Linear) -> None:
    """hidden += projection(x), the add inside the GEMM where the projection has no bias."""
    rows = hidden.view(-1, hidden.shape[-1])
    if projection.bias is None:
        rows.addmm_(x.reshape(rows.shape[0], -1), projection.weight.t())
    else:
        hidden.add_(projection(x.reshape(hidden.shape[0], hidden.shape[1], -1)))


def attend(attention: nn.Module, input_norm: nn.Module, hidden: torch.Tensor, position: torch.Tensor, cos_table: torch.Tensor,
           sin_table: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, visible: torch.Tensor | None,
           rms_norm: Callable[[nn.Module, torch.Tensor], torch.Tensor], scratch: attention_kernels.AttentionScratch | None = None,
           fused_rows: int | None = None) -> None:
    """hidden += attention(input_norm(hidden)) for hidden (B, T, H): one decode step (T = 1) or T
    consecutive tokens from slot `position` on (a speculative verification), writing their keys and
    values. The norm and q/k/v projections are one launch up to `fused_rows` rows (default
    attention_kernels.FEW_TOKENS); above, `rms_norm` and cuBLAS. With a scratch (batch <=
    attention_kernels.FEW_TOKENS) the attention runs as the decode kernel, else SDPA under `visible`
    (B or 1, 1, T, max_len)."""
    if attention_kernels.norm_qkv_fusable(attention, hidden.shape[0] * hidden.shape[1], fused_rows):
        projected = attention_kernels.norm_qkv(input_norm, attention, hidden)
    else:
        normed = rms_norm(input_norm, hidden)
        projected = attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)
    queries = attention_kernels.rope_and_cache(*projected, cos_table, sin_table, position, key_cache, value_cache,
                                               getattr(attention, "q_norm", None), getattr(attention, "k_norm", None))
    if scratch is not None:
        out = attention_kernels.decode_attention(queries, key_cache, value_cache, position, attention.scaling, scratch)
    else:
        out = F.scaled_dot_product_attention(queries, key_cache, value_cache, attn_mask=visible, scale=attention.scaling,
                                             enable_gqa=True).transpose(1, 2)
    _add_projection(hidden, out, attention.o_proj)


def dense_ffn(mlp: nn.Module, normed: torch.Tensor, hidden: torch.Tensor) -> None:
    """hidden += mlp(normed)."""
    _add_projection(hidden, attention_kernels.silu_mul(mlp.gate_proj(normed), mlp.up_proj(normed)), mlp.down_proj)
