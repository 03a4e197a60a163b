"""sparsify's experts implementation: transformers' fused expert weights run as grouped GEMMs.

Registered with transformers' experts interface (`sparsify.experts.registry`), so the model keeps
its own router and its checkpoint format; only how `experts(hidden, top_k_index, top_k_weights)`
is computed changes. Plain PyTorch ops: runs, and is tested, on CPU as on the GPU.

    y_t = sum_{j < k} w_tj * down_{e_tj}( silu(gate_{e_tj} x_t) * up_{e_tj} x_t )

Where the time went in transformers' `grouped_mm` forward (../shared/notes/kernels.md), and what
this does instead:

- **Every expert selected (k = E, fine-moe's exact layout)**: nothing is sparse, so the layer is
  run as the dense FFN it is: one GEMM against all experts' gate_up rows, SwiGLU, each expert's
  slice of the intermediate scaled by its routing weight, one GEMM against all down columns. The
  weight can move inside because down is linear: w * down(h) = down(w * h).
- **k < E**: (token, slot) pairs sorted by expert, grouped GEMMs over the sorted rows (offsets
  from `searchsorted`, no host synchronisation, so CUDA graphs can capture it). The routing
  weight is applied to the intermediate (S x I) rather than the output (S x H), and rows move
  with gathers whose backward is a gather too (a permutation is inverted, not scatter-added).
- **LoRA on the experts** (`sparsify.experts.lora`): the frozen base GEMM plus the low-rank update
  as two more grouped GEMMs, Y = X W^T + s (X A_e^T) B_e^T, never W + s B A.
- Frozen expert weights (router training) get no weight gradient: autograd only computes the
  gradients of inputs that require one.
- The routed SwiGLU w * silu(g) * u is one fused Triton kernel each way on a GPU
  (`sparsify.experts.swiglu_kernel`).
- **Few tokens, no gradients, on a GPU (decode)**: a Triton kernel pair that reads each touched
  expert's weights once and needs no sort (`sparsify.experts.decode_kernel`).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from sparsify.errors import SparsifyError
from sparsify.experts import decode_kernel
from sparsify.experts.lora import PENDING, ExpertLora, active_expert_lora
from sparsify.experts.swiglu_kernel import weighted_swiglu


def supports(experts: torch.nn.Module) -> bool:
    """The expert layouts this implementation computes: gated experts with a concatenated [gate; up]
    weight (E, 2I, H) and down (E, H, I), no biases, no post-expert norm, the default gate
    (act(gate) * up). Read from the weights and whichever layout flags this transformers version
    sets (older ones set fewer); others go to transformers' own implementation."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3 or down.dim() != 3:
        return False
    count, double_width, hidden = gate_up.shape
    if down.shape != (count, hidden, double_width // 2) or not hasattr(experts, "act_fn"):
        return False
    gate = getattr(type(experts), "_apply_gate", None)
    return (not getattr(experts, "is_transposed", False) and getattr(experts, "is_concatenated", True)
            and not getattr(experts, "has_bias", False) and getattr(experts, "has_gate", True)
            and not getattr(experts, "has_post_expert_norm", False) and not getattr(experts, "_is_expert_parallel", False)
            and (gate is None or gate.__name__ == "_default_apply_gate"))


@cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_mm(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """rows (S, K) sorted by group, weight (G, K, N), ends (G,) int32 cumulative row counts ->
    (S, N), rows of group g multiplied by weight[g]. PyTorch's grouped GEMM where it runs (CUDA
    SM80+, CPU with 16-byte aligned operands), else a loop over the groups."""
    kernel = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if rows.device.type == "cuda":
        runs = _cuda_capability(rows.device.index or 0) >= (8, 0)
    else:
        runs = rows.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
    if kernel is not None and runs:
        return kernel(rows, weight, offs=ends)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]).tolist()
    return torch.cat([rows[s:e] @ weight[g] for g, (s, e) in enumerate(zip(starts, ends.tolist()))])


class _Reorder(torch.autograd.Function):
    """rows[order] for a permutation `order`; its backward is the inverse gather (no scatter-add)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _Spread(torch.autograd.Function):
    """x (T, H) -> the row of each sorted pair: x[order // k]. Backward: each token's k pair
    gradients, put back in (token, slot) order by the inverse permutation and summed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        per_pair = grad.index_select(0, inverse)
        return per_pair.view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


def _all_experts(experts, x: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor, lora: ExpertLora | None) -> torch.Tensor:
    """k = E: the dense FFN with per-(token, expert) weights on the intermediate."""
    tokens, hidden = x.shape
    count, double_width, _ = experts.gate_up_proj.shape
    width = double_width // 2
    per_expert = torch.zeros(tokens, count, dtype=weights.dtype, device=weights.device).scatter(1, top_k_index, weights)
    gate_up = (x @ experts.gate_up_proj.reshape(count * double_width, hidden).t()).view(tokens, count, double_width)
    if lora is not None and lora.gate_up is not None:
        gate_up = gate_up + lora.gate_up.all_experts(x)
    intermediate = weighted_swiglu(gate_up.reshape(tokens * count, double_width), per_expert.reshape(-1),
                                   experts.act_fn).view(tokens, count, width)
    if tokens < width:  # few tokens (decode): E small GEMMs, summed; never copy the weight
        out = torch.bmm(intermediate.transpose(0, 1), experts.down_proj.transpose(1, 2)).sum(0)
    else:  # one GEMM over every expert's columns; the (H, E*I) copy is smaller than E outputs of (T, H)
        down = experts.down_proj.permute(1, 0, 2).reshape(hidden, count * width)
        out = intermediate.reshape(tokens, count * width) @ down.t()
    if lora is not None and lora.down is not None:
        out = out + lora.down.all_experts_summed(intermediate)
    return out


def _sorted_pairs(experts, x, top_k_index, weights, lora: ExpertLora | None) -> torch.Tensor:
    """k < E: the (token, slot) pairs sorted by expert through grouped GEMMs."""
    tokens, hidden = x.shape
    k = top_k_index.shape[-1]
    count = experts.gate_up_proj.shape[0]
    expert_of_pair, order = torch.sort(top_k_index.reshape(-1), stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    ends = torch.searchsorted(expert_of_pair, torch.arange(count, device=order.device, dtype=expert_of_pair.dtype),
                              right=True).to(torch.int32)
    rows = _Spread.apply(x, order, inverse, k)  # (S, H)
    gate_up = grouped_mm(rows, experts.gate_up_proj.transpose(1, 2), ends)
    if lora is not None and lora.gate_up is not None:
        gate_up = gate_up + lora.gate_up.grouped(rows, ends)
    pair_weights = _Reorder.apply(weights.reshape(-1, 1), order, inverse).reshape(-1)
    intermediate = weighted_swiglu(gate_up, pair_weights, experts.act_fn)
    out = grouped_mm(intermediate, experts.down_proj.transpose(1, 2), ends)
    if lora is not None and lora.down is not None:
        out = out + lora.down.grouped(intermediate, ends)
    return _Reorder.apply(out, inverse, order).view(tokens, k, hidden).sum(1)


def _few_token_kernel_applies(experts, x: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor) -> bool:
    """Decode-sized inference on a GPU with SiLU experts: the Triton kernel pair (decode_kernel.py)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, experts.gate_up_proj, experts.down_proj))
    return (not needs_grad and top_k_index.numel() <= decode_kernel.MAX_PAIRS and "SiLU" in type(experts.act_fn).__name__
            and experts.gate_up_proj.is_contiguous() and experts.down_proj.is_contiguous() and decode_kernel.available(x))


def sparsify_experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts interface's signature: hidden (T, H), top_k_index (T, k), top_k_weights (T, k)."""
    if not supports(experts):
        if experts.__dict__.get(PENDING):
            raise SparsifyError(f"{type(experts).__name__} has LoRA factored for sparsify's experts implementation, which "
                                "cannot run its layout; set SPARSIFY_EXPERTS=keep")
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    dtype = experts.gate_up_proj.dtype
    x = hidden_states.to(dtype)
    weights = top_k_weights.to(dtype)
    lora = active_expert_lora(experts, dtype)
    if lora is None and _few_token_kernel_applies(experts, x, top_k_index, weights):
        return decode_kernel.few_token_experts(experts.gate_up_proj, experts.down_proj, x, top_k_index, weights).to(hidden_states.dtype)
    if top_k_index.shape[-1] == experts.gate_up_proj.shape[0]:
        out = _all_experts(experts, x, top_k_index, weights, lora)
    else:
        out = _sorted_pairs(experts, x, top_k_index, weights, lora)
    return out.to(hidden_states.dtype)
