"""Speed of MoE experts against the dense FFN they came from, on the GPU machine; prints JSON.

Three phases, each timing the dense model and the layouts sparsify makes from it (fine-moe G=8
top-8 / top-4 / top-2, moe E=8 k=2) at the SmolLM2-135M and Llama-3.2-1B shapes, bf16:

- `layer`: one FFN layer, forward + backward over `--tokens` tokens, under each experts
  implementation (transformers' `eager` and `grouped_mm`, sparsify's `sparsify`, Liger's fused MoE
  `liger` when installed). Two modes: `train` (expert/FFN weights get gradients) and `frozen`
  (router training: weights frozen, gradients for the input and the router only).
- `train`: one router-training step (forward, backward, AdamW) of the whole model as `sparsify
  train` runs it (LoRA r=16 on attention and experts, routers in fp32, bf16 autocast) against the
  dense model's LoRA step with the same flags; tokens/s.
- `generate`: prefill and decode at batch 1, 4 and 16 (prompt `--prompt-len`, `--decode-tokens`
  new tokens), under both decode engines (transformers `generate`, and sparsify's CUDA-graph
  engine), through the product's own harness (eval/cost.py). Each decode figure comes with the
  weight bytes one step reads relative to dense: every non-expert weight, plus the experts the
  batch touches, E * (1 - (1 - k/E)^B) of E on average under uniform routing.

    python bench/moe_speed.py --phase layer --shapes smollm2,llama-1b --tokens 16384

Models have random weights (speed does not depend on them; uniform random routing is the
assumption of the bytes arithmetic). Each figure is a median of `--repeats` timed runs after
`--warmup` untimed ones; `vs_dense` is dense time / this time (above 1: faster than dense). An
implementation that fails (missing package, unsupported shape) is reported with its error.
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
# The rest of each shape, for the whole-model phases: layers, attention heads, KV heads. Vocabulary:
# SmolLM2's tokenizer (49,152) for both, with tied embeddings, as the issue's figures were taken.
MODEL_SHAPES = {"smollm2": (30, 9, 3), "llama-1b": (16, 32, 8)}
VOCAB = 49152
DEVICE = "cuda"  # the figures are GPU figures; a CPU dry run of the code paths sets this


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


def describe_error(error: Exception) -> str:
    """A failing candidate is a result too: its error, first line."""
    first = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}"


def cuda_ms(run) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    grad = torch.randn_like(x)
    for _ in range(warmup):
        module(x).backward(grad)
    times = [cuda_ms(lambda: module(x).backward(grad)) for _ in range(repeats)]
    module.zero_grad(set_to_none=True)
    return times


def dense_mlp(hidden: int, d_ff: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=d_ff, hidden_act="silu"))


def moe_config(hidden: int, d_ff: int, layout: Layout, **extra):
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=hidden, intermediate_size=d_ff // layout.granularity, num_local_experts=layout.experts,
                         num_experts_per_tok=layout.top_k, hidden_act="silu", **extra)


def moe_block(hidden: int, d_ff: int, layout: Layout, implementation: str):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = moe_config(hidden, d_ff, layout)
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    return block


def set_mode(module: torch.nn.Module, mode: str) -> None:
    """`train`: every weight gets a gradient. `frozen` (router training): only the router does."""
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(mode == "train" or name.startswith("gate."))


def layer_phase(args, results: Results) -> None:
    from sparsify.experts import register

    missing = register()  # sparsify's implementation and the candidates whose packages import
    for shape in args.shapes.split(","):
        hidden, d_ff = SHAPES[shape]
        x = torch.randn(1, args.tokens, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        for mode in args.modes.split(","):
            dense = dense_mlp(hidden, d_ff).to(DEVICE, torch.bfloat16)
            set_mode(dense, mode)
            dense_ms = statistics.median(time_fwd_bwd(dense, x, args.warmup, args.repeats))
            results.append({"phase": "layer", "shape": shape, "mode": mode, "layout": "dense", "implementation": "torch",
                            "ms": dense_ms, "vs_dense": 1.0})
            del dense
            for layout in LAYOUTS:
                for implementation in args.implementations.split(","):
                    entry = {"phase": "layer", "shape": shape, "mode": mode, "layout": layout.name, "implementation": implementation,
                             "active_ffn_flops_vs_dense": layout.top_k / layout.granularity}
                    if implementation in missing:
                        results.append({**entry, "error": missing[implementation]})
                        continue
                    try:
                        block = moe_block(hidden, d_ff, layout, implementation).to(DEVICE, torch.bfloat16)
                        if implementation == "sparsify":  # never time a silent fallback under this name
                            from sparsify.experts.grouped import supports

                            assert supports(block.experts), "sparsify's experts implementation does not take this layout"
                        set_mode(block, mode)
                        times = time_fwd_bwd(block, x, args.warmup, args.repeats)
                    except Exception as error:  # noqa: BLE001 - a failing candidate is a result too
                        results.append({**entry, "error": describe_error(error)})
                        continue
                    ms = statistics.median(times)
                    results.append({**entry, "ms": ms, "min_ms": min(times), "max_ms": max(times), "vs_dense": dense_ms / ms})
                    del block
                torch.cuda.empty_cache()


def build_model(shape: str, layout: Layout | None, seed: int = 0):
    """A random bf16 model on the GPU: Llama for dense, Mixtral (sparsify's native target) for a layout."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, d_ff = SHAPES[shape]
    layers, heads, kv_heads = MODEL_SHAPES[shape]
    common = {"num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "vocab_size": VOCAB, "tie_word_embeddings": True, "max_position_embeddings": 4096}
    config = LlamaConfig(hidden_size=hidden, intermediate_size=d_ff, **common) if layout is None else moe_config(hidden, d_ff, layout, **common)
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def layouts_named(names: str) -> list[Layout | None]:
    chosen = [None]  # dense first: every ratio is against it
    for name in names.split(","):
        chosen += [layout for layout in LAYOUTS if layout.name.startswith(name)]
    return chosen


def router_training_step(model, decisions, ids: torch.Tensor, optimizer) -> None:
    with torch.autocast(DEVICE, dtype=torch.bfloat16), decisions.watch() as seen:
        output = model(input_ids=ids, labels=ids)
        loss = output.loss + decisions.loss(output, seen)[0]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def router_training(shape: str, layout: Layout | None, implementation: str, batch: int, seq_len: int):
    """What one step of `sparsify train` works on: the model with LoRA r=16 on attention and
    experts (FFN for dense) and its routers trainable, its decisions, AdamW, and a batch of ids."""
    from sparsify.convert.moe.decisions import find_decisions
    from sparsify.experts import register
    from sparsify.train.decisions import Decisions
    from sparsify.train.lora import LoraSettings, add_adapters

    register()
    model = build_model(shape, layout)
    model.config.use_cache = False
    if layout is not None:
        model.set_experts_implementation(implementation)
    decisions = (find_decisions(model, {}) if layout is not None else None) or Decisions()
    model = add_adapters(model, LoraSettings(16, 32.0), decisions)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, VOCAB, (batch, seq_len), device=DEVICE)
    return model, decisions, optimizer, ids


def train_phase(args, results: Results) -> None:
    for shape in args.shapes.split(","):
        dense_tps = None
        for layout in layouts_named(args.layouts):
            for implementation in (["dense"] if layout is None else args.implementations.split(",")):
                entry = {"phase": "train", "shape": shape, "layout": "dense" if layout is None else layout.name,
                         "implementation": implementation, "batch": args.train_batch, "seq_len": args.seq_len, "lora_rank": 16}
                try:
                    model, decisions, optimizer, ids = router_training(shape, layout, implementation, args.train_batch, args.seq_len)
                    for _ in range(args.warmup):
                        router_training_step(model, decisions, ids, optimizer)
                    times = [cuda_ms(lambda: router_training_step(model, decisions, ids, optimizer)) for _ in range(args.repeats)]
                except Exception as error:  # noqa: BLE001
                    results.append({**entry, "error": describe_error(error)})
                    continue
                finally:
                    model = optimizer = None
                    torch.cuda.empty_cache()
                tokens_per_s = args.train_batch * args.seq_len / (statistics.median(times) / 1000)
                dense_tps = tokens_per_s if layout is None else dense_tps
                results.append({**entry, "step_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                                "tokens_per_s": tokens_per_s, "vs_dense": tokens_per_s / dense_tps if dense_tps else None})


@dataclass(frozen=True)
class WeightBytes:
    """A model's weight bytes, split into routed experts and everything else."""

    experts: int
    other: int

    @classmethod
    def of(cls, model) -> "WeightBytes":
        split = {True: 0, False: 0}
        for name, parameter in model.named_parameters():
            split[".experts." in name] += parameter.numel() * parameter.element_size()
        return cls(experts=split[True], other=split[False])

    def per_step(self, layout: Layout | None, batch: int, dense: int) -> dict:
        """Bytes one decode step reads, against dense: all non-expert weights plus the experts the
        batch touches on average under uniform routing, E * (1 - (1 - k/E)^B) of E."""
        if layout is None:
            return {"bytes": dense, "vs_dense": 1.0, "experts_touched": None}
        touched = layout.experts * (1 - (1 - layout.top_k / layout.experts) ** batch)
        read = self.other + self.experts * touched / layout.experts
        return {"bytes": read, "vs_dense": read / dense, "experts_touched": touched}


def generate_phase(args, results: Results) -> None:
    from sparsify.eval.cost import measure_speed
    from sparsify.experts import execution_path, register

    register()
    batches = [int(b) for b in args.batches.split(",")]
    for shape in args.shapes.split(","):
        dense = {}
        dense_bytes = None
        sample = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(0))
        for layout in layouts_named(args.layouts):
            model = build_model(shape, layout)
            if layout is not None:
                model.set_experts_implementation(args.generate_implementation)
            weight_bytes = WeightBytes.of(model)
            if dense_bytes is None:
                dense_bytes = weight_bytes.experts + weight_bytes.other
            for engine in args.engines.split(","):
                name = "dense" if layout is None else layout.name
                try:
                    speed = measure_speed(model, sample, batch_sizes=batches, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                                          warmup=1, repeats=args.repeats, pad_token_id=0, decode_engine=engine)
                except Exception as error:  # noqa: BLE001
                    results.append({"phase": "generate", "shape": shape, "layout": name, "engine": engine,
                                    "error": describe_error(error)})
                    continue
                for key, entry in speed.items():
                    batch = entry["batch"]
                    prefill = entry["prefill_tokens_per_s"]["median"]
                    decode = entry["decode_tokens_per_s"]["median"]
                    if layout is None:
                        dense[(engine, batch)] = (prefill, decode)
                    base = dense.get((engine, batch), (None, None))
                    results.append({"phase": "generate", "shape": shape, "layout": name, "engine": entry["decode_engine"],
                                    "experts_implementation": execution_path(model), "batch": batch,
                                    "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                                    "prefill_vs_dense": prefill / base[0] if base[0] else None,
                                    "decode_vs_dense": decode / base[1] if base[1] and decode else None,
                                    "decode_valid": entry["decode_tokens_per_s"]["valid"],
                                    "weight_bytes_per_step": weight_bytes.per_step(layout, batch, dense_bytes)})
            del model
            torch.cuda.empty_cache()


PHASES = {"layer": layer_phase, "train": train_phase, "generate": generate_phase}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", default="layer", choices=sorted(PHASES))
    parser.add_argument("--shapes", default="smollm2,llama-1b")
    parser.add_argument("--layouts", default="fine-moe G=8 top-8,fine-moe G=8 top-4,fine-moe G=8 top-2,moe E=8",
                        help="train/generate: layouts by name prefix (dense always runs first).")
    parser.add_argument("--tokens", type=int, default=16384, help="layer: tokens per forward.")
    parser.add_argument("--modes", default="train,frozen", help="layer: train (weights get gradients), frozen (router training).")
    parser.add_argument("--implementations", default="grouped_mm,sparsify",
                        help="layer/train: experts implementations (eager, grouped_mm, sparsify, liger).")
    parser.add_argument("--generate-implementation", default="sparsify", help="generate: the experts implementation of the MoE models.")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batches", default="1,4,16", help="generate: batch sizes.")
    parser.add_argument("--engines", default="hf,graph", help="generate: decode engines.")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--progress", default=None, help="Also append each measurement to this file as a JSON line.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/moe_speed.py measures GPU speed: run it on the GPU machine")
    import transformers

    results = Results(args.progress)
    PHASES[args.phase](args, results)
    report = {"bench": "moe_speed", "phase": args.phase, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "settings": vars(args),
              "results": list(results)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
