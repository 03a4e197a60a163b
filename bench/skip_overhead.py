"""Where the time goes in layer skipping: decode speed of a random-weight model of a given shape and
of its skip conversion at fixed skip rates, under both decode engines, against the dense model.

    python bench/skip_overhead.py --shape smollm2 --engines hf,graph --rates 0,0.25,0.5,0.75,1

Engines: "hf" is transformers' generate (eager, one host round trip per gated sublayer to decide);
"graph" is sparsify/engine/graph_decode.py (static KV cache, each step one CUDA graph, gated
sublayers as conditional nodes, decisions never leave the GPU). A rate r sets every gate's bias so
that a fraction r of a calibration prompt's tokens falls below the threshold (random gate
directions, so decisions differ per token); the skip rate actually taken during decode is measured
and reported. Rate 0 = every token kept but every gate evaluated (the pure cost of gating), rate 1
= every gated sublayer skipped and no gate evaluated (the ceiling). Before timing, the graph
engine's greedy tokens are checked against the eager engine's at batch 1.

Prints JSON. Weights are random: only speed is measured (quality needs bench/skip_speed.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

SHAPES = {
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 49152, "tie_word_embeddings": True},
}


@torch.no_grad()
def _calibrate(model, prompt: torch.Tensor, rate: float) -> None:
    """Random gate directions, biases at the `rate` quantile of each gate's logits on `prompt`."""
    generator = torch.Generator().manual_seed(0)
    gates = [gate for _, _, gate in model.skip_gates()]
    inputs: dict[int, torch.Tensor] = {}

    def record(index: int):
        def hook(module, args, out) -> None:  # a hook that returned a value would replace the output
            inputs.setdefault(index, args[0].float().flatten(0, -2))
        return hook

    hooks = [g.register_forward_hook(record(i)) for i, g in enumerate(gates)]
    for gate in gates:
        gate.forced = None
        gate.weight.data = torch.randn(gate.weight.shape, generator=generator).to(gate.weight)
        gate.bias.data.zero_()
    model(input_ids=prompt)
    for hook in hooks:
        hook.remove()
    for i, gate in enumerate(gates):
        if rate >= 1:  # the ceiling: every gated sublayer skipped, no gate evaluated
            gate.forced = False
            continue
        logits = inputs[i] @ gate.weight.float()
        # rate 0: every token kept, but the gates are evaluated (the pure cost of gating)
        level = float(logits.min()) - 1.0 if rate <= 0 else float(torch.quantile(logits, rate))
        gate.bias.data.fill_(-level + gate.logit_threshold)


@torch.no_grad()
def _decode_skip_rate(model, ids: torch.Tensor, steps: int) -> float:
    """Share of gated sublayer decisions that skip during greedy decode (eager engine, batch 1)."""
    from sparsify.engine.graph_decode import GraphDecoder

    if {gate.forced for _, _, gate in model.skip_gates()} == {False}:  # the ceiling: nothing evaluated
        return 1.0
    engine = GraphDecoder(model, batch=1, max_len=ids.shape[1] + steps + 1, use_graph=False)
    engine.prefill(ids[:1])
    engine.decisions = []
    for _ in range(steps):
        engine.step()
    return 1.0 - torch.cat(engine.decisions).float().mean().item()


def _graph_matches_eager(model, ids: torch.Tensor, steps: int) -> float:
    """Share of greedy tokens on which the graph replay and the eager step agree (1.0: all)."""
    from sparsify.engine.graph_decode import GraphDecoder

    runs = [GraphDecoder(model, batch=ids.shape[0], max_len=ids.shape[1] + steps + 1, use_graph=g).generate(ids, steps) for g in (False, True)]
    return (runs[0] == runs[1]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--engines", default="hf,graph")
    parser.add_argument("--rates", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/skip-overhead"))
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    import sparsify  # noqa: F401 - registers SkipForCausalLM
    from sparsify.eval.cost import measure_speed
    from sparsify.engine.graph_decode import graphs_supported
    from sparsify.upcycle import upcycle

    shutil.rmtree(args.work, ignore_errors=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engines = [e for e in args.engines.split(",") if e != "graph" or graphs_supported()]
    config = AutoConfig.for_model("llama", **SHAPES[args.shape])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(args.work / "dense")
    upcycle(str(args.work / "dense"), "skip", args.work / "skip")
    dense = AutoModelForCausalLM.from_pretrained(args.work / "dense", dtype=dtype).to(device).eval()
    skip = AutoModelForCausalLM.from_pretrained(args.work / "skip", dtype=dtype).to(device).eval()
    sample = torch.randint(0, 4000, (4096,), generator=torch.Generator().manual_seed(1))
    prompt = sample[:256][None].to(device)
    settings = {"batch_sizes": [int(b) for b in args.batches.split(",")], "prompt_len": 256, "decode_tokens": args.decode_tokens,
                "warmup": 2, "repeats": args.repeats, "pad_token_id": 0}

    def decode_ms(model, engine: str) -> dict:
        # "problem" is the measurement's verdict (eval/cost.py): a figure with one is not a result.
        speed = measure_speed(model, sample, **settings, decode_engine=engine)
        return {name: {"decode_ms_per_step": e["decode_ms_per_step"]["median"], "min": e["decode_ms_per_step"]["min"],
                       "max": e["decode_ms_per_step"]["max"], "problem": e["decode_ms_per_step"]["problem"],
                       "prefill_tokens_per_s": e["prefill_tokens_per_s"]["median"], "prefill_problem": e["prefill_tokens_per_s"]["problem"]}
                for name, e in speed.items()}

    def speedup_problem(dense: dict, skip: dict) -> str | None:
        """Why dense over skip ms per step is no result (either timing is not one), or None."""
        return "; ".join(f"{side} {m['problem']}" for side, m in (("dense", dense), ("skip", skip)) if m["problem"]) or None

    report = {"benchmark": "skip_overhead", "shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "engines": engines, "graphs_supported": graphs_supported(), "settings": settings,
              "dense": {e: decode_ms(dense, e) for e in engines}, "skip": []}
    print(json.dumps(report, indent=2), flush=True)
    for rate in [float(r) for r in args.rates.split(",")]:
        _calibrate(skip, prompt, rate)
        row = {"target_rate": rate, "decode_skip_rate": _decode_skip_rate(skip, prompt, 32)}
        if "graph" in engines:
            batched = sample[: 16 * 256].reshape(16, 256).to(device)
            row["graph_vs_eager_token_agreement"] = {"batch_1": _graph_matches_eager(skip, prompt, 32),
                                                     "batch_16": _graph_matches_eager(skip, batched, 32)}
        for engine in engines:
            row[engine] = decode_ms(skip, engine)
            dense_ms = report["dense"][engine]
            problems = {b: speedup_problem(dense_ms[b], v) for b, v in row[engine].items()}
            row[f"{engine}_speedup_vs_dense"] = {b: None if problems[b] else dense_ms[b]["decode_ms_per_step"] / v["decode_ms_per_step"]
                                                 for b, v in row[engine].items()}
            row[f"{engine}_speedup_problems"] = {b: why for b, why in problems.items() if why}
        report["skip"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    main()
