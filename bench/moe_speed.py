"""Speed of MoE experts against the dense FFN they came from, on the GPU machine; prints JSON.

Phase `layer` (the first part of the fast-experts work): one FFN layer, forward + backward, bf16,
`--tokens` tokens, for the dense SwiGLU MLP and transformers' Mixtral MoE block at the fine-moe and
moe layouts sparsify makes, under each experts implementation available here: transformers' own
(`eager`, `grouped_mm`; `batched_mm` is for decode-sized batches) and candidates registered with transformers' experts
interface (`liger`: Liger kernel's fused MoE, when the package is installed). The router is the
block's own in every case, so a faster implementation keeps checkpoints native.

    python bench/moe_speed.py --phase layer --shapes smollm2,llama-1b --tokens 16384

Each figure is the median of `--repeats` timed runs (CUDA events) after `--warmup` untimed ones;
`vs_dense` is dense time / this time (above 1: faster than dense). An implementation that fails
(missing package, unsupported shape) is reported with its error, not left out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from dataclasses import dataclass

import torch

# Model shapes: (hidden, d_ff) of SmolLM2-135M and of Llama-3.2-1B.
SHAPES = {"smollm2": (576, 1536), "llama-1b": (2048, 8192)}


class Results(list):
    """The measurements so far; each is also appended to `--progress` as a JSON line when it is
    taken, so a run stopped by a time limit (Triton autotuning can take minutes) still leaves data."""

    def __init__(self, progress: str | None) -> None:
        super().__init__()
        self.progress = progress

    def append(self, entry: dict) -> None:
        super().append(entry)
        if self.progress:
            with open(self.progress, "a") as handle:
                handle.write(json.dumps(entry) + "\n")


@dataclass(frozen=True)
class Layout:
    name: str
    experts: int
    top_k: int
    granularity: int  # expert width = d_ff / granularity


LAYOUTS = (
    Layout("fine-moe G=8 top-8 (exact)", 8, 8, 8),
    Layout("fine-moe G=8 top-4", 8, 4, 8),
    Layout("fine-moe G=8 top-2", 8, 2, 8),
    Layout("moe E=8 k=2", 8, 2, 1),
)


def liger_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Liger kernel's fused MoE on transformers' expert layout (gate_up_proj (E, 2I, H), down_proj (E, H, I))."""
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    return LigerFusedMoEFunction.apply(hidden_states, self.gate_up_proj, self.down_proj, top_k_index.to(torch.int32),
                                       top_k_weights.to(hidden_states.dtype))


CANDIDATES = {"liger": liger_experts_forward}
CANDIDATE_MODULES = {"liger": "liger_kernel.ops.fused_moe"}  # what must import for the candidate to run


def register_candidates() -> dict[str, str]:
    """Register each candidate whose package imports; returns name -> why it is unavailable."""
    import importlib

    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    missing = {}
    for name, forward in CANDIDATES.items():
        try:
            importlib.import_module(CANDIDATE_MODULES[name])
        except Exception as error:  # noqa: BLE001 - any import failure means "not available here"
            missing[name] = f"{type(error).__name__}: {error}"
            continue
        ALL_EXPERTS_FUNCTIONS.register(name, forward)
    return missing


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    grad = torch.randn_like(x)
    for _ in range(warmup):
        module(x).backward(grad)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        module(x).backward(grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    module.zero_grad(set_to_none=True)
    return times


def dense_mlp(hidden: int, d_ff: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=d_ff, hidden_act="silu"))


def moe_block(hidden: int, d_ff: int, layout: Layout, implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=hidden, intermediate_size=d_ff // layout.granularity, num_local_experts=layout.experts,
                           num_experts_per_tok=layout.top_k, hidden_act="silu")
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    return block


def layer_phase(args) -> list[dict]:
    missing = register_candidates()
    results = Results(args.progress)
    for shape in args.shapes.split(","):
        hidden, d_ff = SHAPES[shape]
        x = torch.randn(1, args.tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dense = dense_mlp(hidden, d_ff).to("cuda", torch.bfloat16)
        dense_ms = statistics.median(time_fwd_bwd(dense, x, args.warmup, args.repeats))
        results.append({"shape": shape, "layout": "dense", "implementation": "torch", "ms": dense_ms, "vs_dense": 1.0})
        for layout in LAYOUTS:
            for implementation in args.implementations.split(","):
                entry = {"shape": shape, "layout": layout.name, "implementation": implementation,
                         "active_ffn_flops_vs_dense": layout.top_k / layout.granularity}
                if implementation in missing:
                    results.append({**entry, "error": missing[implementation]})
                    continue
                try:
                    block = moe_block(hidden, d_ff, layout, implementation).to("cuda", torch.bfloat16)
                    times = time_fwd_bwd(block, x, args.warmup, args.repeats)
                except Exception as error:  # noqa: BLE001 - a failing candidate is a result too
                    results.append({**entry, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
                    continue
                ms = statistics.median(times)
                results.append({**entry, "ms": ms, "min_ms": min(times), "max_ms": max(times), "vs_dense": dense_ms / ms})
                del block
            torch.cuda.empty_cache()
    return list(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", default="layer", choices=["layer"])
    parser.add_argument("--shapes", default="smollm2,llama-1b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--implementations", default="eager,grouped_mm,liger")  # batched_mm gathers a weight copy per token: decode only
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--progress", default=None, help="Also append each measurement to this file as a JSON line.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/moe_speed.py measures GPU speed: run it on the GPU machine")
    import transformers

    report = {"bench": "moe_speed", "phase": args.phase, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "tokens": args.tokens,
              "warmup": args.warmup, "repeats": args.repeats, "results": layer_phase(args)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
