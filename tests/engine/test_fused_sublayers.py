"""The decode engine's fused attention and dense FFN sublayers (sparsify/engine/fused_sublayers.py,
attention_kernels.py): not used on CPU (the step stays the model's own modules there); on a GPU the
rope-and-cache kernel reproduces the rotary embedding, q/k norms and cache writes exactly, the
one-launch norm + q/k/v projection and the decode attention kernel match the modules and SDPA, and dense
models of every family decode through the fused sublayers as through their own cached forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from support import IDS, assert_decodes_alike_in_low_precision, engine_decode, reference_decode

from sparsify.convert.skip.modeling_skip import rotate_heads
from sparsify.engine.graph_decode import GraphDecoder

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_on_cpu_the_step_keeps_the_models_own_modules(dense_weights):
    model = AutoModelForCausalLM.from_pretrained(dense_weights["llama"]).eval()
    engine = GraphDecoder(model, batch=1, max_len=8)
    assert not any(layer.fused_attention or layer.fused_mlp for layer in engine.layers)


@gpu
@pytest.mark.parametrize("head_norms", [False, True])
@pytest.mark.parametrize("tokens", [1, 3])  # a decode step; a speculative verification of k + 1 = 3 tokens
def test_rope_and_cache_kernel_matches_the_rotary_embedding_on_gpu(head_norms, tokens):
    from sparsify.engine import attention_kernels

    torch.manual_seed(0)
    dtype, batch, heads, kv_heads, head_dim, max_len, position = torch.bfloat16, 3, 8, 2, 64, 12, 7
    q, k, v = (torch.randn(batch, tokens, n * head_dim, device="cuda", dtype=dtype) for n in (heads, kv_heads, kv_heads))
    angles = torch.rand(max_len, head_dim // 2, device="cuda") * 3
    cos, sin = (torch.cat([f(angles), f(angles)], -1).to(dtype) for f in (torch.cos, torch.sin))
    key_cache, value_cache = torch.zeros(2, batch, kv_heads, max_len, head_dim, device="cuda", dtype=dtype)
    norms = [Qwen3RMSNorm(head_dim).to("cuda", dtype) for _ in range(2)] if head_norms else [None, None]
    for norm in norms if head_norms else []:
        torch.nn.init.normal_(norm.weight)
    where = torch.tensor([position], device="cuda")
    queries = attention_kernels.rope_and_cache(q, k, v, cos, sin, where, key_cache, value_cache, *norms)
    want_q, want_k = q.view(batch, tokens, heads, head_dim), k.view(batch, tokens, kv_heads, head_dim)
    if head_norms:
        want_q, want_k = norms[0](want_q), norms[1](want_k)
    slots = torch.arange(position, position + tokens, device="cuda")
    at = (cos[slots][None], sin[slots][None])
    end = position + tokens
    # To one bf16 rounding step: the same operations, rounded alike, except where the kernel's fp32
    # -> bf16 conversions and PyTorch's land on different sides (seen on the H100 at a few elements).
    one_step = {"rtol": 0.01, "atol": 0.02}
    torch.testing.assert_close(queries, rotate_heads(want_q.transpose(1, 2), *at), **one_step)
    torch.testing.assert_close(key_cache[:, :, position:end], rotate_heads(want_k.transpose(1, 2), *at), **one_step)
    torch.testing.assert_close(value_cache[:, :, position:end], v.view(batch, tokens, kv_heads, head_dim).transpose(1, 2))
    assert key_cache[:, :, :position].abs().sum() == 0 and value_cache[:, :, end:].abs().sum() == 0


@gpu
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 2, 4])  # 4: a speculative verification's k + 1
def test_one_launch_norm_and_qkv_projection_matches_the_modules_on_gpu(bias, tokens):
    from sparsify.engine import attention_kernels

    torch.manual_seed(0)
    attention = torch.nn.Module()
    for name, rows in (("q_proj", 320), ("k_proj", 64), ("v_proj", 64)):  # rows not a multiple of the block
        setattr(attention, name, torch.nn.Linear(200, rows, bias=bias).to("cuda", torch.bfloat16))
    norm = Qwen3RMSNorm(200).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(1, tokens, 200, device="cuda", dtype=torch.bfloat16) * 3
    assert attention_kernels.norm_qkv_fusable(attention, tokens, most=8) and not attention_kernels.norm_qkv_fusable(attention, 9, most=8)
    got = attention_kernels.norm_qkv(norm, attention, x)
    normed = norm(x)
    for out, name in zip(got, ("q_proj", "k_proj", "v_proj")):
        linear = getattr(attention, name)
        want = normed.float() @ linear.weight.float().t() + (linear.bias.float() if bias else 0)
        torch.testing.assert_close(out.float(), want, rtol=0.01, atol=0.02)  # one bf16 rounding of an fp32 sum


@gpu
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,max_len", [(1, 8, 2, 64, 200), (2, 4, 4, 80, 61), (1, 4, 1, 64, 5000)])
@pytest.mark.parametrize("tokens", [1, 4])  # a decode step; a speculative verification of k + 1 = 4 tokens, causal
def test_decode_attention_kernel_matches_sdpa_over_the_visible_slots_on_gpu(batch, heads, kv_heads, head_dim, max_len, tokens):
    from sparsify.engine import attention_kernels

    torch.manual_seed(0)
    queries = torch.randn(batch, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # as rope_and_cache returns
    keys, values = torch.randn(2, batch, kv_heads, max_len, head_dim, device="cuda", dtype=torch.bfloat16)
    scratch = attention_kernels.AttentionScratch(keys, heads, tokens)
    assert scratch.splits <= attention_kernels.MAX_SPLITS
    # One scratch across positions, as the engine's layers and steps share it: its tickets must reset.
    for position in sorted({0, 1, max_len // 2, max_len - tokens}):
        last = position + tokens - 1
        masked = keys.clone()
        masked[:, :, last + 1:] = 1e4  # slots past the last token's must not count
        got = attention_kernels.decode_attention(queries, masked, values, torch.tensor([position], device="cuda"),
                                                 head_dim ** -0.5, scratch)
        slots = torch.arange(max_len, device="cuda")
        visible = (slots[None, :] <= position + torch.arange(tokens, device="cuda")[:, None])[None, None]  # token t: up to position + t
        want = torch.nn.functional.scaled_dot_product_attention(queries.float(), keys.float(), values.float(), attn_mask=visible,
                                                                scale=head_dim ** -0.5, enable_gqa=True)
        torch.testing.assert_close(got.float(), want.transpose(1, 2).reshape(batch, tokens, -1), rtol=0.01, atol=0.01)
    assert scratch.tickets.eq(0).all()


@gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dense_models_decode_through_the_fused_sublayers_like_their_cached_forward_on_gpu(family, dense_weights):
    model = AutoModelForCausalLM.from_pretrained(dense_weights[family], dtype=torch.bfloat16).cuda().eval()
    engine = GraphDecoder(model, batch=2, max_len=16)
    assert all(layer.fused_attention and layer.fused_mlp for layer in engine.layers)
    prompt = IDS[:, :6].cuda()
    with torch.no_grad():
        want_ids, want = reference_decode(model, prompt, steps=8)
        got_ids, got = engine_decode(model, prompt, steps=8, use_graph=True)
    assert_decodes_alike_in_low_precision((got_ids, got), (want_ids, want))
