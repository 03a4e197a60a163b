"""Layer skip on a real model, end to end: convert, train the gates, sweep the threshold.

    python bench/skip_speed.py --model smollm2-135m --data train.jsonl.gz --eval-data valid.jsonl.gz \
        --tokens 5M --target-skip 0.4 --thresholds 0.3,0.5,0.7,0.9 --work /tmp/skip-bench

Prints JSON: the training result, then for the teacher and each threshold the held-out perplexity
at two context lengths, the skip rate, and prefill/decode tokens/s at batch 1 and 16 measured
with the same harness (`sparsify skip-sweep`); sweep.png draws the trade-off. A speed-up whose
model or teacher timing is not a result (eval/cost.py's verdict) is null, with the reason in
"speedup_problems", and is left out of the plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--tokens", default="5M")
    parser.add_argument("--target-skip", type=float, default=0.4)
    parser.add_argument("--skip-weight", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--thresholds", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--windows", default="512,2048")
    parser.add_argument("--eval-tokens", default="64k")
    parser.add_argument("--decode-engine", default="graph", help="hf or graph (sparsify/engine/graph_decode.py)")
    parser.add_argument("--reuse-trained", action="store_true", help="Sweep the model a previous run left in --work.")
    parser.add_argument("--freeze-below", type=float, default=None, help="Freeze gates skipping less than this (calibrated on --data).")
    parser.add_argument("--freeze-above", type=float, default=None, help="Freeze gates skipping more than this.")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/skip-bench"))
    args = parser.parse_args()
    from sparsify.eval.options import EvalOptions
    from sparsify.convert.skip.sweep import skip_sweep
    from sparsify.convert.skip.freezing import FreezeRule
    from sparsify.train.loop import train
    from sparsify.train.options import TrainOptions
    from sparsify.upcycle import upcycle

    started = time.perf_counter()
    report = {"benchmark": "skip_speed", "model": args.model, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.reuse_trained:
        trained_folder = args.work / "skip-trained"
    else:
        shutil.rmtree(args.work, ignore_errors=True)
        converted = upcycle(args.model, "skip", args.work / "skip").output
        options = TrainOptions.of(data=args.data, eval_data=args.eval_data, tokens=args.tokens, batch_size=args.batch_size,
                               target_skip=args.target_skip, skip_weight=args.skip_weight, eval_every=0, checkpoint_every=0,
                               **{k: v for k, v in (("lr", args.lr), ("lora_rank", args.lora_rank)) if v is not None})
        trained = train(converted, options, output=args.work / "skip-trained")
        trained_folder = trained.output
        report["training"] = {"tokens": trained.tokens, "tokens_per_s": trained.tokens_per_second,
                              "peak_memory_gib": trained.peak_memory_bytes / 2**30, "before": trained.before, "after": trained.after}
        print(json.dumps(report, indent=2), flush=True)
    if not args.thresholds:
        return
    settings = EvalOptions(teacher=args.model, data=args.eval_data, tokens=args.eval_tokens, batch_size=4, routing_tokens="32k",
                           speed_batch="1,16", prompt_len=256, decode_tokens=64, repeats=5,
                           decode_engine=args.decode_engine)
    freeze = FreezeRule.from_options(args.freeze_below, args.freeze_above)
    sweep = skip_sweep(str(trained_folder), [float(t) for t in args.thresholds.split(",")], [int(w) for w in args.windows.split(",")],
                       settings, output=args.work / "sweep", freeze=freeze, calibration_data=args.data if freeze else None)
    report["sweep"] = sweep
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    main()
