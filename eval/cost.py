"""Cost: parameters (total and active), analytic FLOPs per token, measured speed and memory.

Speed is measured, never inferred: prefill is one forward pass over a batch of prompts; decode is
the time per generated token with the KV cache, taken as the difference between generating N
tokens and generating 1 (so the prompt's prefill cancels out). Every figure is the median of
`repeats` runs after `warmup` runs, reported with its min and max, the raw seconds of each run, and
a verdict (`valid`, `problem`): timing that cannot be trusted is marked where it is taken, never
clamped into a number.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsify.convert import hooks


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Unique parameters (tied ones once); active = what one token uses (k of E experts)."""
    seen: set[int] = set()
    total = experts = matrices = 0
    for module_name, module in model.named_modules():
        in_experts = module_name.split(".")[-1] == "experts" or ".experts." in f"{module_name}."
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            experts += param.numel() if in_experts else 0
            matrices += param.numel() if param.dim() >= 2 else 0
    embedding = model.get_input_embeddings().weight.numel()
    # The share of the routed experts one token uses (k / E), from the variant that finds routers.
    share = next((s for active_share in hooks("active_expert_share") if (s := active_share(model)) is not None), 1.0)
    unused = experts - round(experts * share)
    return {"total": total, "active": total - unused, "embedding": embedding, "experts": experts,
            "active_non_embedding": total - unused - embedding, "active_matrices": matrices - unused}


def flops_per_token(model: nn.Module, params: dict[str, int], context: int) -> dict[str, float]:
    """Forward FLOPs per token at `context` tokens: 2 per active matrix weight (a multiply and an
    add; the input embedding is a lookup, the output head a matmul even when tied), plus the
    attention scores and weighted sum over the average causal context (context + 1) / 2. Norms,
    biases and activations are left out (well under 1%)."""
    config = model.config
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    matmul_weights = params["active_matrices"] - params["embedding"] + (output.weight.numel() if tied else 0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * (context + 1) / 2
    return {"context": context, "weights": 2.0 * matmul_weights, "attention": attention, "total": 2.0 * matmul_weights + attention}


# Fewer runs than this cannot show how much a figure moves between runs (with 1 run the spread is
# 0 by construction), so the figure is shown but not trusted.
MIN_REPEATS = 3
# Bound on (max - min) / median of the per-run times. Speed-ups worth reporting here are 1.1-2x; when
# one figure's own runs differ by more than half its median, noise is the size of the effect and a
# ratio of two medians says nothing. Ordinary jitter on a shared CPU or GPU (10-30%) stays under it.
MAX_SPREAD = 0.5


def timing_problem(seconds: list[float], non_positive: str = "a time that is not positive") -> str | None:
    """Why these per-run times are not a result, or None when they are. The text starts with the
    kind ("invalid", "too few repeats", "unstable"), then a colon and the detail."""
    bad = sum(t <= 0 for t in seconds)
    if bad:
        return f"invalid: {bad} of {len(seconds)} repeats gave {non_positive}"
    if len(seconds) < MIN_REPEATS:
        return f"too few repeats: {len(seconds)}, fewer than {MIN_REPEATS} cannot show the spread"
    spread = (max(seconds) - min(seconds)) / statistics.median(seconds)
    if spread > MAX_SPREAD:
        return f"unstable: times spread {spread:.0%} of their median (max-min; bound {MAX_SPREAD:.0%})"
    return None


def timing_stats(seconds: list[float], figure: Callable[[float], float],
                 non_positive: str = "a time that is not positive") -> dict[str, Any]:
    """Median, min and max of `figure(t)` over the per-run times, with the verdict and the raw times.
    A time that is not positive has no figure (tokens/s would be infinite), so then median, min and
    max are None rather than a clamped stand-in."""
    problem = timing_problem(seconds, non_positive)
    values = [figure(t) for t in seconds] if all(t > 0 for t in seconds) else []
    return {"median": statistics.median(values) if values else None, "min": min(values, default=None),
            "max": max(values, default=None), "repeats": len(seconds), "valid": problem is None, "problem": problem,
            "seconds": seconds}


def _timed(run: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    for _ in range(warmup):
        once()
    return [once() for _ in range(repeats)]


def _model_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _start_peak(device: torch.device) -> int:
    """Reset the high-water mark; returns what is allocated now (other models included)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_bytes(model: nn.Module, device: torch.device, baseline: int) -> int | None:
    """This model's own peak: its weights plus what the measured work allocated beyond the baseline,
    so a teacher loaded in the same process is not counted against the model (or the reverse)."""
    if device.type != "cuda":
        return None
    return _model_bytes(model) + torch.cuda.max_memory_allocated(device) - baseline


def measure_speed(model: nn.Module, sample: torch.Tensor, *, batch_sizes: list[int], prompt_len: int, decode_tokens: int,
                  warmup: int, repeats: int, pad_token_id: int, decode_engine: str = "hf", draft_tokens: int = 4,
                  draft_threshold: float | None = None, draft: str = "auto") -> dict[str, Any]:
    """Prefill and decode tokens/s at each batch size, on prompts cut from `sample` (real text).
    Decode runs through `generate` ("hf") or the static-cache CUDA-graph engine ("graph",
    sparsify/engine/graph_decode.py), or a skip model's greedy self-speculative decoding on that engine
    ("speculative": `draft_tokens` per round, drafted by the model's draft head, or as DraftPlan.for_model
    says; `draft` as draft_head.draft_head_for takes it); prefill is always
    the model's own forward pass. Each entry names the path it timed: the decode engine and, for an
    MoE, the experts implementation; a speculative entry also what the draft ran and what was accepted."""
    from sparsify.experts import execution_path

    device = next(model.parameters()).device
    experts = execution_path(model)
    results = {}
    for batch in batch_sizes:
        needed = batch * prompt_len
        ids = sample.repeat(needed // len(sample) + 1)[:needed].reshape(batch, prompt_len).to(device)
        entry: dict[str, Any] = {"batch": batch, "prompt_len": prompt_len}
        if experts is not None:
            entry["experts_implementation"] = experts
        baseline = _start_peak(device)
        with torch.no_grad():
            prefill = _timed(lambda: model(input_ids=ids, use_cache=True), device, warmup, repeats)
        entry["prefill_tokens_per_s"] = timing_stats(prefill, lambda t: needed / t)
        entry["prefill_peak_bytes"] = _peak_bytes(model, device, baseline)
        if decode_tokens > 1 and decode_engine == "speculative":
            from sparsify.convert.skip.draft_head import describe, draft_head_for
            from sparsify.convert.skip.draft_plan import DraftPlan
            from sparsify.engine.speculative_decode import time_speculative_decode

            head = draft_head_for(model, draft)
            plan = None if head is not None else DraftPlan.for_model(model, draft_threshold)
            baseline = _start_peak(device)
            timing = time_speculative_decode(model, ids, decode_tokens, plan, draft_tokens, warmup=warmup, repeats=repeats, head=head)
            per_token = timing.seconds_per_token
            entry["decode_engine"] = "speculative" if timing.use_graph else "speculative (static cache, eager)"
            described = ({"draft": describe(head), "draft_head": head.config.training} if head is not None else
                         {"draft": plan.summary(len(model.skip_gates())), "plan": plan.to_config()})
            entry["decode_speculative"] = {**described, **timing.stats.record()}
            non_positive = "a speculative decode time that is not positive"
        elif decode_tokens > 1 and decode_engine == "graph":
            from sparsify.engine.graph_decode import time_decode_steps

            baseline = _start_peak(device)
            per_token, engine = time_decode_steps(model, ids, decode_tokens, warmup=warmup, repeats=repeats)
            entry["decode_engine"] = "graph" if engine.use_graph else "static-cache (eager: no CUDA graphs here)"
            if experts is not None:  # MoE decode: the fused routed-FFN kernels, or the model's blocks and why
                entry["decode_moe_sublayer"] = "fused kernels" if engine.routed_ffn_kernels else f"model's block ({engine.routed_ffn_skipped})"
            non_positive = "a decode step time that is not positive"
        elif decode_tokens > 1:
            baseline = _start_peak(device)

            def generate(new_tokens: int) -> Callable[[], Any]:
                return lambda: model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, use_cache=True, pad_token_id=pad_token_id,
                )

            with torch.no_grad():
                _timed(generate(decode_tokens), device, warmup, 0)
                # Each repeat times 1 token then N tokens back to back, so drift hits both alike.
                pairs = [(_timed(generate(1), device, 0, 1)[0], _timed(generate(decode_tokens), device, 0, 1)[0]) for _ in range(repeats)]
            # The fastest 1-token run is the fixed cost (prompt, set-up). A difference that is not
            # positive (a busy machine slowed the 1-token run, or the N-token run got lucky) is kept
            # as it is: the verdict marks it invalid instead of a clamp turning it into 1e9 tokens/s.
            fixed = min(first for first, _ in pairs)
            per_token = [(full - fixed) / (decode_tokens - 1) for _, full in pairs]
            entry["decode_generate_seconds"] = {"one_token": [first for first, _ in pairs], "n_tokens": [full for _, full in pairs]}
            non_positive = f"a {decode_tokens}-token generate no slower than the fastest 1-token one"
        if decode_tokens > 1:
            entry.setdefault("decode_engine", decode_engine)
            entry["decode_tokens_per_s"] = timing_stats(per_token, lambda t: batch / t, non_positive)
            entry["decode_ms_per_step"] = timing_stats(per_token, lambda t: 1000 * t, non_positive)
            entry["decode_tokens"] = decode_tokens
            entry["decode_peak_bytes"] = _peak_bytes(model, device, baseline)
        results[f"batch_{batch}"] = entry
    return results


def process_peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    except OSError:
        return None
