"""How far a fresh MoT conversion starts from its dense model, by group size, temperature and MoT layers.

    python bench/mot_start.py --data-dir ../shared/data --out bench/results/mot_start.json \
        --experts 16 --layers all,later-half --group-sizes 1,2,4 --temperatures 1,0.3,0.1,0.03 --starts weights,data

No training: each conversion is scored as written on
the train split's hashed held-out 1% (the tune text: settings are chosen here, never on valid or the other
domain). Starts: weights (contiguous slices, controller from the experts' mean gate rows) and data
(coactivation clusters and a controller fitted on --calibration-tokens of the train split, which never
reads the held-out 1%). Perplexity, ratio to the teacher's and KL to it; windows are batched --batch-size at a time, so
G of them mix. Runs on CPU or GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--layers", default="all,later-half")
    parser.add_argument("--group-sizes", default="1,2,4")
    parser.add_argument("--temperatures", default="1,0.3,0.1,0.03")
    parser.add_argument("--starts", default="weights,data", help="weights, data (calibrated on the train split)")
    parser.add_argument("--calibration-tokens", default="128k")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from sparsify.data import is_heldout, iter_documents
    from sparsify.eval.quality import measure_quality
    from sparsify.eval.text import build_eval_text
    from sparsify.option_values import parse_list
    from sparsify.sources import load_model, load_tokenizer
    from sparsify.upcycle import upcycle

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(args.model)
    tune = (d for d in iter_documents(str(args.data_dir / "corpus" / "train.jsonl.gz")) if is_heldout(d, 0.01))
    text = build_eval_text(tune, tokenizer, args.tokens)
    teacher = load_model(args.model, dtype=dtype).to(device).eval()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for start, layers in ((start, layers) for start in parse_list(args.starts) for layers in parse_list(args.layers)):
            folder = Path(work) / f"{start}-{layers}"
            calibration = ({"calibration_data": str(args.data_dir / "corpus" / "train.jsonl.gz"), "calibration_tokens": args.calibration_tokens}
                           if start == "data" else {})
            started = time.perf_counter()
            upcycle(args.model, "mot", folder, experts=args.experts, group_size=1, layers=layers, **calibration)
            print(json.dumps({"start": start, "layers": layers, "converted_seconds": round(time.perf_counter() - started, 1)}), flush=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
            for size in map(int, parse_list(args.group_sizes)):
                model.set_group_size(size)
                for temperature in map(float, parse_list(args.temperatures)) if size > 1 else [1.0]:
                    model.set_temperature(temperature)
                    started = time.perf_counter()
                    quality = measure_quality(model, text, window=args.window, stride=args.window // 2, batch_size=args.batch_size,
                                              teacher=teacher)
                    row = {"start": start, "layers": layers, "group_size": size, "temperature": temperature, "perplexity": quality["model"]["perplexity"],
                           "ratio": quality["model"]["perplexity"] / quality["teacher"]["perplexity"], "kl": quality["vs_teacher"]["kl"],
                           "seconds": time.perf_counter() - started}
                    rows.append(row)
                    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            del model
    result = {"benchmark": "mot_start", "model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "text": "tune", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
