"""The routed SwiGLU, h = w * silu(g) * u, as one Triton kernel forward and one backward.

Rows are (token, expert) pairs: gate_up (R, 2I) holds [g; u] per row, w (R,) the row's routing
weight. In plain PyTorch this is three elementwise passes forward and about seven backward over
tensors of R x I (at the Llama-1B shape and 16k tokens, 268 MB each); fused, one pass each way.
Backward, with s = sigmoid(g):

    dg = dh * w * u * s * (1 + g (1 - s)),   du = dh * w * g s,   dw = sum_i dh * g s * u

GPU only; `weighted_swiglu` falls back to the PyTorch expression elsewhere (same math).
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

BLOCK = 1024


@cache
def triton_available() -> bool:
    """Triton ships with CUDA builds of PyTorch; sparsify does not depend on it otherwise."""
    return importlib.util.find_spec("triton") is not None


@cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def forward(gate_up_ptr, weight_ptr, out_ptr, width: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        weight = tl.load(weight_ptr + row).to(tl.float32)
        for c0 in range(0, width, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            ok = c < width
            g = tl.load(gate_up_ptr + row * 2 * width + c, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(gate_up_ptr + row * 2 * width + width + c, mask=ok, other=0.0).to(tl.float32)
            h = g * tl.sigmoid(g) * u * weight
            tl.store(out_ptr + row * width + c, h.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def backward(gate_up_ptr, weight_ptr, grad_ptr, grad_gate_up_ptr, grad_weight_ptr, width: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        weight = tl.load(weight_ptr + row).to(tl.float32)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, width, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            ok = c < width
            g = tl.load(gate_up_ptr + row * 2 * width + c, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(gate_up_ptr + row * 2 * width + width + c, mask=ok, other=0.0).to(tl.float32)
            dh = tl.load(grad_ptr + row * width + c, mask=ok, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            silu = g * s
            total += dh * silu * u
            dg = dh * weight * u * s * (1.0 + g * (1.0 - s))
            tl.store(grad_gate_up_ptr + row * 2 * width + c, dg.to(grad_gate_up_ptr.dtype.element_ty), mask=ok)
            tl.store(grad_gate_up_ptr + row * 2 * width + width + c, (dh * weight * silu).to(grad_gate_up_ptr.dtype.element_ty), mask=ok)
        tl.store(grad_weight_ptr + row, tl.sum(total, axis=0).to(grad_weight_ptr.dtype.element_ty))

    return forward, backward


def _block(width: int) -> int:
    import triton

    return min(BLOCK, triton.next_power_of_2(width))


class _WeightedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows, double_width = gate_up.shape
        width = double_width // 2
        out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
        if rows:
            _kernels()[0][(rows,)](gate_up, weight, out, width=width, BLOCK=_block(width))
        ctx.save_for_backward(gate_up, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, weight = ctx.saved_tensors
        rows, double_width = gate_up.shape
        grad_gate_up = torch.empty_like(gate_up)
        grad_weight = torch.empty_like(weight)
        if rows:
            _kernels()[1][(rows,)](gate_up, weight, grad.contiguous(), grad_gate_up, grad_weight, width=double_width // 2,
                                    BLOCK=_block(double_width // 2))
        return grad_gate_up, grad_weight


def weighted_swiglu(gate_up: torch.Tensor, weight: torch.Tensor, act_fn=torch.nn.functional.silu) -> torch.Tensor:
    """gate_up (R, 2I) with [g; u] per row, weight (R,) -> (R, I) = weight * act(g) * u."""
    if gate_up.device.type == "cuda" and triton_available() and gate_up.is_contiguous() and "SiLU" in type(act_fn).__name__:
        return _WeightedSwiGLU.apply(gate_up, weight.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up * weight[:, None]
