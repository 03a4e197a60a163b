"""Router-training benchmark (run it on the GPU machine): SmolLM2-135M -> fine-moe G=8, top-4.

Phases (each adds its figures to one JSON object, rewritten after every phase so a timeout keeps
what finished):
  throughput  tokens/s of MoE router training vs a dense LoRA fine-tune of the same model, same
              flags and harness (steady state: the first 25% of steps are excluded)
  memory      peak GPU memory with the teacher computed inside the student ("self") vs a
              separately loaded dense teacher (the naive two-model setup)
  main        the real run: held-out perplexity of teacher and student before and after, KL,
              top-1 agreement, tokens/s, peak memory

    python bench/train_router.py --model SmolLM2.gguf --data train.jsonl.gz --eval-data valid.jsonl.gz \
        --tokens 20M --phases throughput,memory,main --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from sparsify.sources import load_model
from sparsify.train.loop import train
from sparsify.train.options import TrainOptions
from sparsify.upcycle import upcycle


def prepare(model: str, work: Path) -> dict[str, Path]:
    """The fine-moe student (bf16) and the dense model as a bf16 folder (the separate teacher)."""
    from sparsify.sources import open_source

    paths = {"fmoe": work / "fmoe", "dense": work / "dense"}
    if not paths["fmoe"].exists():
        upcycle(model, "fine-moe", paths["fmoe"], granularity=8, top_k=4, dtype="bfloat16")
    if not paths["dense"].exists():
        dense = load_model(model, dtype=torch.bfloat16)
        dense.save_pretrained(paths["dense"])
        open_source(model).write_sidecars(paths["dense"])
    return paths


def run(model_dir: Path, options: TrainOptions, output: Path) -> dict:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = train(model_dir, options, output=output, restart=True)
    steady = [e for e in result.history if e["step"] > len(result.history) // 4]
    if len(steady) >= 2:
        tokens = steady[-1]["tokens"] - steady[0]["tokens"]
        seconds = steady[-1]["elapsed_s"] - steady[0]["elapsed_s"]
        steady_rate = tokens / seconds
    else:
        steady_rate = result.tokens_per_second
    return {
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 1),
        "tokens_per_s": round(steady_rate),
        "peak_memory_gib": round(result.peak_memory_bytes / 2**30, 3),
        "before": result.before,
        "after": result.after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--tokens", default="20M")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--router-lr", type=float, default=5e-3)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--short-steps", type=int, default=40, help="steps of the throughput and memory phases")
    parser.add_argument("--phases", default="throughput,memory,main")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-train-router"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    report: dict = {"benchmark": "train_router", "args": {k: str(v) for k, v in vars(args).items()}, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "student": "SmolLM2-135M-Instruct -> fine-moe G=8 top-4 (half the FFN active), bf16"}

    def emit() -> None:
        text = json.dumps(report, indent=2)
        if args.json:
            args.json.write_text(text)
        print(text, flush=True)

    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.model, args.work)
    report["prepare_s"] = round(time.perf_counter() - started, 1)
    common = dict(
        data=args.data, eval_data=args.eval_data, seq_len=args.seq_len, batch_size=args.batch_size,
        lr=args.lr, router_lr=args.router_lr, lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank, checkpoint_every=0,
    )
    short_tokens = str(args.short_steps * args.batch_size * args.seq_len)
    phases = args.phases.split(",")
    if "throughput" in phases:
        options = TrainOptions.of(**common, tokens=short_tokens, eval_every=0, eval_tokens="16k")
        moe = run(paths["fmoe"], options, args.work / "t-moe")
        # The dense LoRA baseline needs a teacher of its own (as its own teacher it would learn
        # nothing, and sparsify refuses that): the same dense model, loaded separately, as a
        # student's dense path costs about one dense forward too.
        dense = run(paths["dense"], TrainOptions.of(**common, tokens=short_tokens, eval_every=0, eval_tokens="16k",
                                                 teacher=str(paths["dense"])), args.work / "t-dense")
        report["throughput"] = {
            "moe_tokens_per_s": moe["tokens_per_s"], "dense_lora_tokens_per_s": dense["tokens_per_s"],
            "moe_over_dense": round(moe["tokens_per_s"] / dense["tokens_per_s"], 3),
            "moe_peak_memory_gib": moe["peak_memory_gib"], "dense_peak_memory_gib": dense["peak_memory_gib"],
        }
        emit()
    if "memory" in phases:
        options = TrainOptions.of(**common, tokens=short_tokens, eval_every=0, eval_tokens="16k")
        own = run(paths["fmoe"], options, args.work / "m-self")
        naive = run(paths["fmoe"], TrainOptions.of(**{**common, "teacher": str(paths["dense"])}, tokens=short_tokens, eval_every=0, eval_tokens="16k"), args.work / "m-naive")
        report["memory"] = {
            "self_teacher_peak_gib": own["peak_memory_gib"], "separate_teacher_peak_gib": naive["peak_memory_gib"],
            "self_teacher_tokens_per_s": own["tokens_per_s"], "separate_teacher_tokens_per_s": naive["tokens_per_s"],
        }
        emit()
    if "main" in phases:
        options = TrainOptions.of(**common, tokens=args.tokens, eval_every=250, eval_tokens="128k")
        main_run = run(paths["fmoe"], options, args.work / "main")
        before, after = main_run["before"], main_run["after"]
        report["main"] = {
            **{k: main_run[k] for k in ("steps", "tokens", "seconds", "tokens_per_s", "peak_memory_gib")},
            "heldout_tokens": after["tokens"],
            "teacher_ppl": round(after["teacher_ppl"], 3),
            "student_ppl_before": round(before["student_ppl"], 3),
            "student_ppl_after": round(after["student_ppl"], 3),
            "ratio_after": round(after["student_ppl"] / after["teacher_ppl"], 4),
            "kl_before": round(before["kl"], 4), "kl_after": round(after["kl"], 4),
            "top1_before": round(before["top1_agreement"], 4), "top1_after": round(after["top1_agreement"], 4),
            "goal_within_1.10x": after["student_ppl"] <= 1.10 * after["teacher_ppl"],
            "log": str(args.work / "main.run" / "log.jsonl"),
        }
        emit()
    report["total_s"] = round(time.perf_counter() - started, 1)
    emit()


if __name__ == "__main__":
    main()
