"""The baseline learned per-token skipping must beat: dropping whole sublayers for every token.

    python bench/static_skip_baseline.py --model smollm2-135m --data valid.jsonl.gz --fractions 0.1,0.2,0.3

Sublayers are ranked by how little they change the residual stream (ShortGPT-style influence:
1 - cosine(input, input + output), averaged over tokens of calibration text taken from the start
of --data; the scored text follows it, so the two do not overlap), then the lowest fraction is
removed (its gate forced closed: for attention the same KV rule as learned skipping) and the
held-out perplexity is measured against the dense model's on the same windows. Prints JSON.
Runs on CPU in minutes for SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--fractions", default="0.1,0.2,0.3")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    import sparsify  # noqa: F401 - registers SkipForCausalLM
    from sparsify.data import iter_documents
    from sparsify.eval.quality import measure_quality
    from sparsify.eval.text import EvalText, build_eval_text
    from sparsify.sources import load_tokenizer
    from sparsify.upcycle import upcycle

    tokenizer = load_tokenizer(args.model)
    text = build_eval_text(iter_documents(args.data, "text"), tokenizer, args.calibration_tokens + args.tokens)
    calibration = text.ids[: args.calibration_tokens]
    held_out = EvalText(ids=text.ids[args.calibration_tokens:], is_target=text.is_target[args.calibration_tokens:],
                        num_bytes=text.num_bytes, num_documents=text.num_documents)  # bytes unused here (perplexity only)
    with tempfile.TemporaryDirectory() as work:
        model = AutoModelForCausalLM.from_pretrained(upcycle(args.model, "skip", Path(work) / "skip").output).eval()
    gates = model.skip_gates()

    influence: dict[tuple[int, str], float] = {}

    # The residual stream before/after each sublayer, read from the decoder layers' own inputs and outputs.
    streams: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for i, block in enumerate(model.model.layers):
        hooks.append(block.register_forward_pre_hook(lambda m, a, kw, i=i: streams.__setitem__(i, (kw.get("hidden_states", a[0] if a else None),)),
                                                     with_kwargs=True))
        hooks.append(block.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: streams.__setitem__(i, (*streams[i][:1], a[0]))))
        hooks.append(block.register_forward_hook(lambda m, a, out, i=i: streams.__setitem__(i, (*streams[i][:2], out[0] if isinstance(out, tuple) else out))))
    with torch.no_grad():
        model(input_ids=calibration[None])
    for hook in hooks:
        hook.remove()
    for i, (before, middle, after) in streams.items():
        for sublayer, (a, b) in (("attention", (before, middle)), ("ffn", (middle, after))):
            influence[(i, sublayer)] = 1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()
    ranked = sorted(influence, key=influence.get)

    def perplexity() -> float:
        return measure_quality(model, held_out, window=args.window, stride=args.window // 2, batch_size=4)["model"]["perplexity"]

    dense = perplexity()
    result = {"benchmark": "static_skip_baseline", "model": args.model, "tokens": len(held_out.ids), "window": args.window,
              "dense_perplexity": dense, "influence_order": [[f"{layer}.{sublayer}", round(influence[(layer, sublayer)], 5)] for layer, sublayer in ranked], "rows": []}
    for fraction in [float(f) for f in args.fractions.split(",")]:
        removed = set(ranked[: round(fraction * len(gates))])
        for layer, sublayer, gate in gates:
            gate.forced = False if (layer, sublayer) in removed else None
        value = perplexity()
        result["rows"].append({"fraction_removed": fraction, "removed": sorted(f"{layer}.{sublayer}" for layer, sublayer in removed),
                               "perplexity": value, "perplexity_ratio": value / dense})
        print(json.dumps(result["rows"][-1]), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
