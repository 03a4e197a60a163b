"""Expert load of MoE folders on held-out text: per layer, tokens of the busiest expert over the mean,
through the routing probe `sparsify eval` uses. Prints one JSON line per model.

    python bench/routing_load.py MODEL_DIR [MODEL_DIR ...] --data ../shared/data/corpus/valid.jsonl.gz \
        --tokenizer smollm2-135m --tokens 65536
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from sparsify.convert.moe.probe import ExpertRoutingProbe
    from sparsify.data import iter_documents
    from sparsify.eval.text import build_eval_text
    from sparsify.sources import load_tokenizer

    text = build_eval_text(iter_documents(args.data), load_tokenizer(args.tokenizer), args.tokens)
    usable = len(text.ids) // args.seq_len * args.seq_len
    ids = torch.as_tensor(text.ids[:usable]).view(-1, args.seq_len)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for folder in args.models:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device).eval()
        probe = ExpertRoutingProbe.find(model)
        probe.attach()
        with torch.no_grad():
            for batch in ids.split(args.batch_size):
                model(batch.to(device))
        probe.detach()
        summary = probe.summary()
        layers = summary["layers"]
        print(json.dumps({"model": folder, "tokens": summary["tokens"], "max_imbalance": summary["max_imbalance"],
                          "mean_imbalance": sum(layer["imbalance"] for layer in layers) / len(layers),
                          "entropy": summary["mean_entropy_normalised"]}), flush=True)


if __name__ == "__main__":
    main()
