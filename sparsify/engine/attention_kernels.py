"""Triton kernels for the decode step's attention sublayer and the dense FFN's activation
(sparsify/engine/graph_decode.py).

At batch 1 a decode step is bound by kernel count and latency, not bytes (bench/profile_decode_step.py:
the dense Llama-1B step ran ~490 kernels, 30 per layer, at a third of HBM bandwidth). Between its
projections the attention sublayer spent about a dozen small kernels: rotary embedding of the
queries and of the keys (multiplies, a negation, a concatenation, an add each), per-head q/k norms
in Qwen3, two cache writes. Then cuBLAS ran k_proj and v_proj (2 MB each) at ~5 us apiece, and
SDPA spent ~10 us on one query row (its own kernel plus the boolean mask's conversion). Here:

    norm_qkv          at 1-2 tokens (up to 8 in a speculative verification): the input RMSNorm
                      and q/k/v projections in one launch, reading the three weights where they
                      are (no concatenated copy)
    rope_and_cache    program (sequence x token, head): query head -> norm?, rotate, write the
                      query buffer; KV head -> norm?, rotate the key, write key and value at the
                      token's slot
    decode_attention  at 1-2 sequences: program (sequence x token, head, block of slots), partial
                      softmax sums merged by the last block to finish (an atomic ticket): one
                      launch. A speculative verification's k + 1 tokens are k + 1 queries of a
                      sequence, each seeing the slots up to its own (causal over the cache).
    silu_mul          transformers' act(gate) * up in one kernel instead of two

Each reads the position from the device (no host synchronisation, so the graph replays it at
every step). Rounding follows transformers' modules operation by operation (each product and sum
rounded to the activations' dtype) where they are elementwise; the projections and the attention
round once from an fp32 sum, as cuBLAS and SDPA do. Block sizes from bench/tune_moe_decode.py
--attention.
"""

from __future__ import annotations

from functools import cache

import torch


@cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_and_cache(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, position_ptr, query_out_ptr, keys_ptr, values_ptr,
                       q_norm_ptr, k_norm_ptr, eps, max_len, tokens, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr):
        # Program (sequence x token, head): token t of a sequence sits at slot position + t. Queries,
        # keys and values come in (B, T, heads, d) order, and the queries go out in that order.
        row = tl.program_id(0)  # sequence * tokens + token
        sequence = row // tokens
        head = tl.program_id(1)
        dtype = query_out_ptr.dtype.element_ty
        half = tl.arange(0, HALF)
        ok = half < HEAD_DIM // 2
        position = tl.load(position_ptr) + row % tokens
        cos1 = tl.load(cos_ptr + position * HEAD_DIM + half, mask=ok, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + position * HEAD_DIM + HEAD_DIM // 2 + half, mask=ok, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + position * HEAD_DIM + half, mask=ok, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + position * HEAD_DIM + HEAD_DIM // 2 + half, mask=ok, other=0.0).to(tl.float32)
        is_query = head < HEADS
        kv_head = head - HEADS
        if is_query:
            source = q_ptr + (row * HEADS + head) * HEAD_DIM
            norm_ptr = q_norm_ptr
        else:
            source = k_ptr + (row * KV_HEADS + kv_head) * HEAD_DIM
            norm_ptr = k_norm_ptr
        x1 = tl.load(source + half, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(source + HEAD_DIM // 2 + half, mask=ok, other=0.0).to(tl.float32)
        if QK_NORM:  # Qwen3: RMSNorm over the head before the rotation
            squares = tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)
            scale = 1.0 / tl.sqrt(squares / HEAD_DIM + eps)
            w1 = tl.load(norm_ptr + half, mask=ok, other=0.0).to(tl.float32)
            w2 = tl.load(norm_ptr + HEAD_DIM // 2 + half, mask=ok, other=0.0).to(tl.float32)
            x1 = (w1 * (x1 * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            x2 = (w2 * (x2 * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), each operation rounded
        out1 = ((x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)).to(dtype)
        if is_query:
            target = query_out_ptr + (row * HEADS + head) * HEAD_DIM
        else:
            target = keys_ptr + ((sequence * KV_HEADS + kv_head) * max_len + position) * HEAD_DIM
            value = v_ptr + (row * KV_HEADS + kv_head) * HEAD_DIM
            value_target = values_ptr + ((sequence * KV_HEADS + kv_head) * max_len + position) * HEAD_DIM
            tl.store(value_target + half, tl.load(value + half, mask=ok), mask=ok)
            tl.store(value_target + HEAD_DIM // 2 + half, tl.load(value + HEAD_DIM // 2 + half, mask=ok), mask=ok)
        tl.store(target + half, out1, mask=ok)
        tl.store(target + HEAD_DIM // 2 + half, out2, mask=ok)

    @triton.jit
    def silu_mul(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(gate_ptr + i, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + i, mask=ok, other=0.0).to(tl.float32)
        activated = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        tl.store(out_ptr + i, (activated * up).to(dtype), mask=ok)

    @triton.jit
    def norm_qkv(x_ptr, norm_ptr, eps, q_w_ptr, k_w_ptr, v_w_ptr, q_b_ptr, k_b_ptr, v_b_ptr, q_out_ptr, k_out_ptr, v_out_ptr,
                 tokens, HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, Q_ROWS: tl.constexpr, KV_ROWS: tl.constexpr,
                 TOKENS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # The attention's input RMSNorm and its three projections in one launch: program blocks
        # [0, q) are q_proj's rows, then k's, then v's. Every program norms the few input rows itself
        # (a few KB from L2) rather than waiting on a separate norm kernel.
        block = tl.program_id(0)
        q_blocks: tl.constexpr = (Q_ROWS + BLOCK_N - 1) // BLOCK_N
        kv_blocks: tl.constexpr = (KV_ROWS + BLOCK_N - 1) // BLOCK_N
        if block < q_blocks:
            w_ptr, b_ptr, out_ptr, rows, first = q_w_ptr, q_b_ptr, q_out_ptr, Q_ROWS, block * BLOCK_N
        elif block < q_blocks + kv_blocks:
            w_ptr, b_ptr, out_ptr, rows, first = k_w_ptr, k_b_ptr, k_out_ptr, KV_ROWS, (block - q_blocks) * BLOCK_N
        else:
            w_ptr, b_ptr, out_ptr, rows, first = v_w_ptr, v_b_ptr, v_out_ptr, KV_ROWS, (block - q_blocks - kv_blocks) * BLOCK_N
        dtype = out_ptr.dtype.element_ty
        t = tl.arange(0, TOKENS)
        t_ok = t < tokens
        h = tl.arange(0, BLOCK_H)
        whole = tl.load(x_ptr + t[:, None] * HIDDEN + h[None, :], mask=t_ok[:, None] & (h < HIDDEN)[None, :], other=0.0).to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(whole * whole, axis=1) / HIDDEN + eps)  # per token, as the norm module computes it
        n = first + tl.arange(0, BLOCK_N)
        n_ok = n < rows
        acc = tl.zeros((TOKENS, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < HIDDEN
            x = tl.load(x_ptr + t[:, None] * HIDDEN + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            gain = tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            normed = (gain[None, :] * (x * scale[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)  # rounded as the module rounds
            w = tl.load(w_ptr + n[:, None] * HIDDEN + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc += normed[:, None, :] * w[None, :, :]
        y = tl.sum(acc, axis=2)
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + t[:, None] * rows + n[None, :], y.to(dtype), mask=t_ok[:, None] & n_ok[None, :])

    @triton.jit
    def decode_attention(q_ptr, keys_ptr, values_ptr, position_ptr, out_ptr, partial_ptr, count_ptr, scale, max_len, tokens,
                         HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        # Program (sequence, query head, split): an online softmax over the split's blocks of cache
        # slots, written as a partial (weighted value sum, max, sum of weights); the last split of a
        # head to finish (an atomic ticket) merges the partials and resets the ticket, so one launch
        # does both stages. Slots past the step's position (read from the device: the graph replays
        # it) are masked, unread. Long caches loop over more blocks per split rather than growing a
        # block, which would spill registers.
        query = tl.program_id(0)  # sequence * tokens + token: token t sees the slots up to position + t
        sequence = query // tokens
        head = tl.program_id(1)
        split = tl.program_id(2)
        row = query * HEADS + head
        kv_head = head // (HEADS // KV_HEADS)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        length = tl.load(position_ptr) + 1 + query % tokens
        base = (sequence * KV_HEADS + kv_head).to(tl.int64) * max_len * HEAD_DIM
        q = tl.load(q_ptr + row * HEAD_DIM + d, mask=d_ok, other=0.0).to(tl.float32)
        best = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for block in range(BLOCKS_PER_SPLIT):
            slot = (split * BLOCKS_PER_SPLIT + block) * BLOCK_L + tl.arange(0, BLOCK_L)
            visible = slot < length
            ok = visible[:, None] & d_ok[None, :]
            where = base + slot[:, None] * HEAD_DIM + d[None, :]
            key = tl.load(keys_ptr + where, mask=ok, other=0.0).to(tl.float32)
            scores = tl.where(visible, tl.sum(key * q[None, :], axis=1) * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            pivot = tl.where(new_best == float("-inf"), 0.0, new_best)  # nothing visible yet: weights stay zero
            shrink = tl.exp(best - pivot)
            p = tl.exp(scores - pivot)
            value = tl.load(values_ptr + where, mask=ok, other=0.0).to(tl.float32)
            total = total * shrink + tl.sum(p, axis=0)
            acc = acc * shrink + tl.sum(p[:, None] * value, axis=0)
            best = new_best
        partial = partial_ptr + (row * SPLITS + split) * (BLOCK_D + 2)
        tl.store(partial + d, acc)
        tl.store(partial + BLOCK_D + tl.arange(0, 1), best)
        tl.store(partial + BLOCK_D + 1 + tl.arange(0, 1), total)
        ticket = tl.atomic_add(count_ptr + row, 1)  # acq_rel: the stores above are visible to the last split
        if ticket == SPLITS - 1:
            s = tl.arange(0, BLOCK_S)
            s_ok = s < SPLITS
            partials = partial_ptr + (row * SPLITS + s) * (BLOCK_D + 2)
            bests = tl.load(partials + BLOCK_D, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
            totals = tl.load(partials + BLOCK_D + 1, mask=s_ok, other=0.0, cache_modifier=".cg")
            sums = tl.load(partials[:, None] + d[None, :], mask=s_ok[:, None], other=0.0, cache_modifier=".cg")
            weight = tl.exp(bests - tl.max(bests, axis=0))  # slot 0 is always visible, so the max is finite
            out = tl.sum(sums * weight[:, None], axis=0) / tl.sum(totals * weight, axis=0)
            tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
            tl.atomic_xchg(count_ptr + row, 0)

    return rope_and_cache, silu_mul, norm_qkv, decode_attention


def rope_and_cache(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                   position: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, q_norm: torch.nn.Module | None,
                   k_norm: torch.nn.Module | None) -> torch.Tensor:
    """queries (B, T, heads*d), keys / values (B, T, kv_heads*d): the projections of T consecutive
    tokens (one in a decode step, k + 1 in a speculative verification); cos/sin tables (max_len, d);
    position (1,) on the device, the first token's slot; caches (B, kv_heads, max_len, d). Writes
    the rotated keys and the values at slots position .. position + T - 1, returns the rotated
    queries (B, heads, T, d) (a view of a (B, T, heads, d) buffer, the order decode_attention reads)."""
    import triton

    kernel = _kernels()[0]
    batch, kv_heads, max_len, head_dim = key_cache.shape
    tokens = queries.shape[1]
    heads = queries.shape[-1] // head_dim
    out = torch.empty(batch, tokens, heads, head_dim, dtype=queries.dtype, device=queries.device)
    norms = q_norm is not None
    kernel[(batch * tokens, heads + kv_heads)](queries, keys, values, cos_table, sin_table, position, out, key_cache, value_cache,
                                               q_norm.weight if norms else queries, k_norm.weight if norms else queries,
                                               q_norm.variance_epsilon if norms else 0.0, max_len, tokens, HEADS=heads, KV_HEADS=kv_heads,
                                               HEAD_DIM=head_dim, HALF=triton.next_power_of_2(head_dim // 2), QK_NORM=norms, num_warps=1)
    return out.transpose(1, 2)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    import triton

    kernel = _kernels()[1]
    out = torch.empty_like(gate)
    block = 1024
    kernel[(triton.cdiv(gate.numel(), block),)](gate, up, out, gate.numel(), BLOCK=block)
    return out


FEW_TOKENS = 2  # up to this many rows the q/k/v projections and the attention run as Triton kernels
QKV_BLOCK_N, QKV_BLOCK_K, QKV_WARPS = 4, 256, 8  # bench/tune_moe_decode.py --attention
ATTENTION_BLOCK_L, ATTENTION_WARPS = 16, 1
MAX_SPLITS = 64  # the merge holds every split's partial in registers; longer caches give each split more blocks
# Above this cache length SDPA is faster (H100, 32 heads x 128: 26 vs 60 us at 4,096 slots, 128 vs 73 us at 32,768)
MAX_KERNEL_CACHE = 8192


def norm_qkv_fusable(attention: torch.nn.Module, rows: int, most: int | None = None) -> bool:
    """Whether `norm_qkv` serves this attention at `rows` tokens: at most `most` (a speculative
    verification passes token_run.FUSED_ROWS; default FEW_TOKENS, read when called),
    and q, k and v all with a bias or all without. (The caller has checked the norm: an RMSNorm the engine fuses.)"""
    biases = [getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj")]
    return rows <= (FEW_TOKENS if most is None else most) and len(set(biases)) == 1


def norm_qkv(norm: torch.nn.Module, attention: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q_proj(norm(x)), k_proj(norm(x)), v_proj(norm(x)) in one launch, reading the weights where
    they are (no concatenated copy). x (B, T, H), a few rows in all (norm_qkv_fusable); norm an RMSNorm."""
    import triton

    kernel = _kernels()[2]
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    rows = x.shape[0] * x.shape[1]
    hidden = x.shape[-1]
    q_rows, kv_rows = q.weight.shape[0], k.weight.shape[0]
    outputs = [torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device) for n in (q_rows, kv_rows, kv_rows)]
    has_bias = q.bias is not None
    blocks = triton.cdiv(q_rows, QKV_BLOCK_N) + 2 * triton.cdiv(kv_rows, QKV_BLOCK_N)
    biases = (q.bias, k.bias, v.bias) if has_bias else (q.weight, k.weight, v.weight)  # unused without bias
    kernel[(blocks,)](x, norm.weight, norm.variance_epsilon, q.weight, k.weight, v.weight, *biases, *outputs, rows, HIDDEN=hidden,
                      BLOCK_H=triton.next_power_of_2(hidden), Q_ROWS=q_rows, KV_ROWS=kv_rows, TOKENS=triton.next_power_of_2(rows),
                      HAS_BIAS=has_bias, BLOCK_N=QKV_BLOCK_N, BLOCK_K=QKV_BLOCK_K, num_warps=QKV_WARPS)
    return outputs[0], outputs[1], outputs[2]


def scratch_where_it_fits(key_cache: torch.Tensor, heads: int, tokens: int = 1) -> "AttentionScratch | None":
    """A scratch for the decode attention kernel where it is the faster choice: a batch of at most
    FEW_TOKENS sequences and a cache of at most MAX_KERNEL_CACHE slots; None where SDPA serves."""
    batch, _, max_len, _ = key_cache.shape
    return AttentionScratch(key_cache, heads, tokens) if batch <= FEW_TOKENS and max_len <= MAX_KERNEL_CACHE else None


class AttentionScratch:
    """The decode attention kernel's partials and per-head tickets for one cache shape and `tokens`
    queries per sequence. The tickets start at zero and the kernel leaves them at zero, so one
    scratch serves every layer and every replay of a graph, as long as its launches run one after
    another (one stream)."""

    def __init__(self, key_cache: torch.Tensor, heads: int, tokens: int = 1):
        import triton

        batch, _, max_len, head_dim = key_cache.shape
        self.tokens = tokens
        self.block_l = ATTENTION_BLOCK_L
        self.blocks_per_split = triton.cdiv(triton.cdiv(max_len, self.block_l), MAX_SPLITS)
        self.splits = triton.cdiv(max_len, self.block_l * self.blocks_per_split)
        self.block_d = triton.next_power_of_2(head_dim)
        self.partials = torch.empty(batch * tokens * heads, self.splits, self.block_d + 2, dtype=torch.float32, device=key_cache.device)
        self.tickets = torch.zeros(batch * tokens * heads, dtype=torch.int32, device=key_cache.device)


def decode_attention(queries: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, position: torch.Tensor,
                     scale: float, scratch: AttentionScratch) -> torch.Tensor:
    """queries (B, heads, T, d) of T consecutive tokens, the first at `position` (1,) on the device
    (as rope_and_cache returns them); caches (B, kv_heads, max_len, d) holding slots 0..position +
    T - 1. Token t attends causally: softmax(q k^T * scale) v over slots 0..position + t. Returns
    (B, T, heads*d), the layout o_proj takes."""
    import triton

    kernel = _kernels()[3]
    batch, heads, tokens, head_dim = queries.shape
    if tokens != scratch.tokens:
        raise ValueError(f"scratch made for {scratch.tokens} tokens per sequence, queries have {tokens}")
    queries = queries.transpose(1, 2).contiguous()  # (B, T, heads, d): no copy when rope_and_cache made them
    _, kv_heads, max_len, _ = key_cache.shape
    out = torch.empty(batch, tokens, heads * head_dim, dtype=queries.dtype, device=queries.device)
    kernel[(batch * tokens, heads, scratch.splits)](queries, key_cache, value_cache, position, out, scratch.partials, scratch.tickets,
                                                    scale, max_len, tokens, HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
                                                    BLOCK_D=scratch.block_d, BLOCK_L=scratch.block_l,
                                                    BLOCKS_PER_SPLIT=scratch.blocks_per_split, SPLITS=scratch.splits,
                                                    BLOCK_S=max(2, triton.next_power_of_2(scratch.splits)), num_warps=ATTENTION_WARPS)
    return out
