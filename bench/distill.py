"""Sparse -> dense distillation, the measurement the Switch Transformer made: how much of an upcycled MoE's
gain over its dense parent a dense student of the parent's size keeps.

    python bench/distill.py --data-dir ../shared/data --workdir /tmp/distill --out bench/results/distill.json \
        --budgets 2M,10M --distill-tokens 5M --inits merge,concat,top1,parent [--only STAGES] [--report-only]

Every model is made with the product's own library calls, on the corpus's train split, with the same
training settings (the FFN / experts trained in full at --expert-lr, LoRA on attention):
  baseline@T   the dense parent fine-tuned on T tokens (next-token loss);
  moe@T        the parent upcycled (--experts, --top-k copies of the FFN) and trained on T tokens, experts in full;
  distill-I@T  the MoE of the largest budget folded back with `sparsify distill --init I` and trained on
               --distill-tokens against it (KL mixed with --hard-weight next-token loss, teacher cached);
  baseline@M   the token-matched control: the parent fine-tuned on as many tokens as a student has read in
               all (the MoE's budget plus --distill-tokens).
Scored on three texts no training read: tune (the train split's hashed 1% held-out bucket), valid (the
corpus's valid split) and ood (git's documentation). "gain kept" = (distilled - baseline) / (moe - baseline)
in log-perplexity, against the baseline and MoE of the MoE's budget (the Switch measure), and "kept, token
matched" = (distilled - baseline@M) / (moe - baseline) with the control in place of the baseline. Rows go to WORKDIR/rows.jsonl as they
finish (a killed run continues; two processes may share a workdir with disjoint --only); a stage whose
input is not there yet waits for it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from staged_rows import RowLog, export_model, heldout_texts, wait_for

# The same training for every row: only the loss differs (hard labels for the baseline and the MoE,
# the distillation mix for the students).
COMMON = {"train_experts": "full", "lora_targets": "attention", "eval_every": 0}
FINE_TUNE = {"kl_weight": 0.0, "ce_weight": 1.0}


def stage_names(args) -> list[str]:
    from sparsify.option_values import parse_list

    budgets = parse_list(args.budgets)
    names = ["parent"] + [f"{kind}@{b}" for b in budgets for kind in ("baseline", "moe")]
    return names + [f"distill-{init}@{args.distill_tokens}" for init in parse_list(args.inits)] + [f"baseline@{matched_budget(args)}"]


def matched_budget(args) -> str:
    """The token-matched control's budget: a student has read the MoE's tokens and then its own."""
    from sparsify.option_values import parse_count

    total = parse_count(teacher_budget(args)) + parse_count(args.distill_tokens)
    for unit, size in (("M", 10**6), ("k", 10**3)):
        if total % size == 0:
            return f"{total // size}{unit}"
    return str(total)


def folder(args, name: str) -> Path:
    return args.workdir / name.replace("@", "_")


def teacher_budget(args) -> str:
    from sparsify.option_values import parse_count, parse_list

    return max(parse_list(args.budgets), key=parse_count)


def training_options(args, tokens: str, extra: dict[str, Any]):
    from sparsify.train.options import TrainOptions

    flags = {"data": args.data, "tokens": tokens, "batch_size": args.train_batch, "checkpoint_every": args.checkpoint_every,
             "expert_lr": args.expert_lr, **COMMON, **json.loads(args.train_flags), **extra}
    return TrainOptions.of(**flags)


def train_stage(args, name: str) -> dict[str, Any]:
    from sparsify.train.loop import train
    from sparsify.upcycle import upcycle

    kind, tokens = name.split("@")
    target = folder(args, name)
    parent = folder(args, "parent")
    wait_for(parent, "parent")
    run_dir = target.with_name(target.name + ".run")
    if kind == "baseline":
        source, extra = parent, {**FINE_TUNE, "teacher": str(parent)}
    else:
        source = args.workdir / "moe-init"
        if not (source / "config.json").exists():
            upcycle(str(parent), "moe", source, experts=args.experts, top_k=args.top_k)
        extra = dict(FINE_TUNE)
    started = time.perf_counter()
    result = train(source, training_options(args, tokens, extra), output=target, run_dir=run_dir, resume=(run_dir / "checkpoint").exists())
    return {"seconds": time.perf_counter() - started, "tokens_per_second": result.tokens_per_second, "heldout": result.after}


def distill_stage(args, name: str) -> dict[str, Any]:
    from sparsify.convert.distill.options import DistillOptions
    from sparsify.convert.distill.run import distill

    init = name.split("@")[0].removeprefix("distill-")
    teacher = folder(args, f"moe@{teacher_budget(args)}")
    wait_for(teacher, f"moe@{teacher_budget(args)}")
    target = folder(args, name)
    run_dir = target.with_name(target.name + ".run")
    settings = DistillOptions(init=init, hard_weight=args.hard_weight, calibration_tokens=args.calibration_tokens)
    options = training_options(args, args.distill_tokens, {"cache_teacher": str(args.workdir / f"teacher-cache-{args.cache_name}")})
    started = time.perf_counter()
    result = distill(teacher, target, settings, options, run_dir=run_dir, resume=(run_dir / "checkpoint").exists())
    return {"seconds": time.perf_counter() - started, "tokens_per_second": result.training.tokens_per_second, "heldout": result.training.after}


def score(model_dir: Path, evaluation: dict[str, Any], args) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from sparsify.eval.quality import measure_quality
    from sparsify.experts import use_fast_experts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device).eval()
    use_fast_experts(model)
    scores = {}
    for name, text in evaluation.items():
        quality = measure_quality(model, text, window=args.window, stride=args.window // 2, batch_size=args.batch_size)
        scores[name] = {"perplexity": quality["model"]["perplexity"], "nll": math.log(quality["model"]["perplexity"])}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return scores


def gains(rows: dict[str, dict[str, Any]], args) -> list[dict[str, Any]]:
    """% of the MoE's gain over the baseline each student keeps, per text, at the MoE's budget."""
    budget = teacher_budget(args)
    baseline, moe, matched = rows.get(f"baseline@{budget}"), rows.get(f"moe@{budget}"), rows.get(f"baseline@{matched_budget(args)}")
    if not baseline or not moe:
        return []
    out = []
    for name, row in rows.items():
        if not name.startswith("distill-"):
            continue
        kept = {}
        for text in row["scores"]:
            gap = baseline["scores"][text]["nll"] - moe["scores"][text]["nll"]
            gained = baseline["scores"][text]["nll"] - row["scores"][text]["nll"]
            kept[text] = {"moe_gain_nll": gap, "student_gain_nll": gained, "kept": gained / gap if gap > 0 else None}
            if matched:
                over_matched = matched["scores"][text]["nll"] - row["scores"][text]["nll"]
                kept[text] |= {"student_gain_over_matched_nll": over_matched, "kept_token_matched": over_matched / gap if gap > 0 else None}
        against = [f"baseline@{budget}", f"moe@{budget}"] + ([f"baseline@{matched_budget(args)}"] if matched else [])
        out.append({"student": name, "against": against, **kept})
    return out


def report(args, rows: dict[str, dict[str, Any]]) -> None:
    result = {"benchmark": "distill", "model": args.model, "device": next((r.get("device") for r in rows.values()), "?"),
              "settings": {"experts": args.experts, "top_k": args.top_k, "budgets": args.budgets, "distill_tokens": args.distill_tokens,
                           "hard_weight": args.hard_weight, "expert_lr": args.expert_lr, "train_batch": args.train_batch,
                           "eval_tokens": args.eval_tokens, "window": args.window, **COMMON, **json.loads(args.train_flags)},
              "rows": [rows[name] for name in stage_names(args) if name in rows], "gain_kept": gains(rows, args)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"table": {name: {t: round(s["perplexity"], 3) for t, s in rows[name]["scores"].items()} for name in rows},
                      "gain_kept": [{k: (v if not isinstance(v, dict) else {m: v.get(m) for m in ("kept", "kept_token_matched")})
                                     for k, v in g.items()} for g in result["gain_kept"]]}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budgets", default="2M,10M", help="Training tokens of the baseline and the MoE (comma-separated).")
    parser.add_argument("--distill-tokens", default="5M")
    parser.add_argument("--inits", default="merge,concat,top1,parent")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hard-weight", type=float, default=0.5)
    parser.add_argument("--expert-lr", type=float, default=1e-4)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--train-flags", default="{}", help="More training options for every row, as JSON (e.g. '{\"seq_len\": 256}').")
    parser.add_argument("--calibration-tokens", default="128k")
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", default="", help="Stages to run (comma-separated), e.g. baseline@2M,distill-merge@5M.")
    parser.add_argument("--cache-name", default="a", help="Teacher cache of this process (two processes must not share one).")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.data = str(args.data_dir / "corpus" / "train.jsonl.gz")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = RowLog(args.workdir)
    if args.report_only:
        report(args, rows.recorded())
        return
    import torch

    from sparsify.option_values import parse_list
    from sparsify.sources import load_tokenizer

    evaluation = heldout_texts(args.data_dir, load_tokenizer(args.model), args.eval_tokens)
    wanted = set(parse_list(args.only)) if args.only else None
    for name in stage_names(args):
        if name in rows.recorded() or (wanted is not None and name not in wanted):
            continue
        started = time.perf_counter()
        target = folder(args, name)
        if name == "parent":
            export_model(args.model, target)
            made = {}
        elif name.startswith("distill-"):
            made = distill_stage(args, name)
        else:
            made = train_stage(args, name)
        rows.append({"name": name, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "made": made,
                     "scores": score(target, evaluation, args), "seconds": time.perf_counter() - started})
    report(args, rows.recorded())


if __name__ == "__main__":
    main()
