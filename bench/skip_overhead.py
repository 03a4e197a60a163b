"""Where the time goes in layer skipping: a random-weight model of a given shape, its skip
conversion with gates fixed open, fixed closed, and skipping about half the tokens, timed against
the dense model under the same harness, plus a profile of one decode step.

    python bench/skip_overhead.py --shape smollm2 --work /tmp/skip-overhead

Prints JSON. Weights are random: only speed is measured here (quality needs bench/skip_speed.py).
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


def _set_gates(model, mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    for _, _, gate in model.skip_gates():
        gate.forced = {"open": True, "closed": False}.get(mode)
        if mode == "half":  # a random direction with zero bias: about half the tokens on each side
            gate.weight.data = (torch.randn(gate.weight.shape, generator=generator) * 0.5).to(gate.weight)
            gate.bias.data.zero_()


def _profile(model, device) -> str:
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 4000, (1, 256), device=device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/skip-overhead"))
    parser.add_argument("--tokenizer", help="Folder with the tokenizer files to copy next to the dense model.")
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    import sparsify  # noqa: F401 - registers SkipForCausalLM
    from sparsify.eval.cost import measure_speed
    from sparsify.upcycle import upcycle

    shutil.rmtree(args.work, ignore_errors=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = AutoConfig.for_model("llama", **SHAPES[args.shape])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(args.work / "dense")
    upcycle(str(args.work / "dense"), "skip", args.work / "skip")
    dense = AutoModelForCausalLM.from_pretrained(args.work / "dense", dtype=dtype).to(device).eval()
    skip = AutoModelForCausalLM.from_pretrained(args.work / "skip", dtype=dtype).to(device).eval()
    sample = torch.randint(0, 4000, (4096,))
    settings = {"batch_sizes": [1, 16], "prompt_len": 256, "decode_tokens": 32, "warmup": 1, "repeats": 3, "pad_token_id": 0}

    def summary(model) -> dict:
        speed = measure_speed(model, sample, **settings)
        return {name: {"prefill_tokens_per_s": e["prefill_tokens_per_s"]["median"], "decode_ms_per_step": e["decode_ms_per_step"]["median"]}
                for name, e in speed.items()}

    report = {"benchmark": "skip_overhead", "shape": args.shape, "device": str(device), "dense": summary(dense), "skip": {}}
    for mode in ("open", "half", "closed"):
        _set_gates(skip, mode)
        report["skip"][mode] = summary(skip)
        print(json.dumps(report, indent=2), flush=True)
    _set_gates(skip, "half")
    report["profile_dense_decode_step"] = _profile(dense, device)
    report["profile_skip_half_decode_step"] = _profile(skip, device)
    print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    main()
