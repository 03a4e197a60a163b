"""Conversion quality: how close each way of making a fine-grained MoE stays to its dense teacher,
at 0 training tokens and after a training budget, beside static pruning to the same active fraction.

    python bench/conversion_quality.py --data-dir ../shared/data --workdir /tmp/cq --out bench/results/conversion_quality.json \
        --active 0.25,0.5,0.75 --shared 0,1,2 --methods contiguous,coactivation,prune --train-tokens 0,2M,10M \
        [--training default,hidden,router-first --tune]

Every row is converted with the product's own library calls (`sparsify.upcycle.upcycle`, `sparsify.train.loop.train`)
and scored against the dense model on three texts, none of them used for training or calibration:
  tune   the corpus's train split, documents in the hashed 1% bucket that training holds out (settings are
         chosen on this, with --tune);
  valid  the corpus's valid split;
  ood    git's documentation, a domain the corpus does not contain.
Figures per text: perplexity ratio to the teacher on the same windows, KL(teacher || model), top-1 agreement;
and `sparsify_tiny` accuracy where lm-evaluation-harness is installed. Rows are appended to WORKDIR/rows.jsonl
as they finish, so a killed run continues where it stopped (`--resume` is implied); the JSON and a PNG
(valid perplexity ratio vs active FFN fraction, one line per method and budget) are written at the end.
Calibration and training read the corpus's train split only.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from staged_rows import heldout_texts

# Methods as data: conversion arguments beyond the active fraction. "{calibration}" is the calibration file.
METHODS: dict[str, dict[str, Any]] = {
    "contiguous": {"to": "fine-moe", "split": "contiguous"},  # sparsify's conversion before calibration: partitions in order
    "coactivation": {"to": "fine-moe", "split": "coactivation", "calibration_data": "{calibration}"},
    "coactivation-norefit": {"to": "fine-moe", "split": "coactivation", "calibration_data": "{calibration}", "refit": False},
    # The same split on the sigmoid-routed target (GLM-4.5-MoE), whose selection bias training moves to balance load.
    "coactivation-sigmoid": {"to": "fine-moe", "split": "coactivation", "calibration_data": "{calibration}", "routing": "sigmoid"},
    "prune": {"to": "prune", "calibration_data": "{calibration}"},
    "prune-norefit": {"to": "prune", "calibration_data": "{calibration}", "refit": False},
}


# Training settings compared by --training, as `sparsify train` options on top of the defaults and --train-flags.
# "default" is whatever `sparsify train` does without flags (since the tuning these rows record: lr 2e-3 and
# router lr 1e-2 for fine-moe and prune); the lr-* settings name their rates explicitly.
TRAINING: dict[str, dict[str, Any]] = {
    "default": {},
    "router-first": {"router_first": 0.1},  # Router-Tuning: routers alone for the first 10% of the steps
    "router-first-25": {"router_first": 0.25},
    "hidden": {"hidden_weight": 1.0},  # per-layer FFN-output loss beside the KL
    "hidden-0.1": {"hidden_weight": 0.1},
    "no-balance": {"balance_weight": 0.0},  # for sigmoid routers: loss-free balancing alone
    "lr-1e-3": {"lr": 1e-3, "router_lr": 5e-3},  # the rates used before the tuning (UNTUNED_LEARNING_RATES)
    "lr-2e-3": {"lr": 2e-3, "router_lr": 1e-2},
    "lr-4e-3": {"lr": 4e-3, "router_lr": 2e-2},
    "hidden+router-first": {"hidden_weight": 1.0, "router_first": 0.1},
    "no-bias": {"bias_rate": 0.0},  # sigmoid routers: selection biases fixed at 0 (the balance loss alone)
    "bias-1e-4": {"bias_rate": 1e-4},
}
# Options that only mean something with routers: a pruned (dense) model trains the same without them.
ROUTER_ONLY = {"router_first", "balance_weight", "z_weight", "bias_rate"}
# Options that only mean something with a selection bias (sigmoid routing).
BIAS_ONLY = {"bias_rate"}


@dataclass
class Row:
    method: str
    active: float
    shared: int
    top_k: int
    train_tokens: int
    options: dict[str, Any] = field(default_factory=dict)
    training: str = "default"
    granularity: int = 8

    @property
    def name(self) -> str:
        shape = f"keep{self.active:g}" if self.options["to"] == "prune" else f"s{self.shared}k{self.top_k}"
        shape += f"g{self.granularity}" if self.options["to"] != "prune" and self.granularity != 8 else ""
        suffix = f"+{self.training}" if self.training != "default" and self.train_tokens else ""
        return f"{self.method}-{shape}@{self.train_tokens}{suffix}"

    @property
    def conversion_name(self) -> str:
        return self.name.split("@")[0]


def plan_rows(args, calibration: str) -> list[Row]:
    from sparsify.option_values import parse_count, parse_list

    rows = []
    budgets = [parse_count(b) for b in parse_list(args.train_tokens)]
    for budget, training in ((b, t) for b in budgets for t in (parse_list(args.training) if b else ["default"])):
        for active in [float(a) for a in parse_list(args.active)]:
            for method in parse_list(args.methods):
                options = {k: (v.format(calibration=calibration) if isinstance(v, str) else v) for k, v in METHODS[method].items()}
                options["calibration_tokens"] = args.calibration_tokens
                if options["to"] == "prune":
                    if set(TRAINING[training]) <= ROUTER_ONLY and training != "default":
                        continue  # the same run as the default one
                    options.pop("split", None)
                    rows.append(Row(method, active, 0, 0, budget, {**options, "keep": active}, training))
                    continue
                if set(TRAINING[training]) <= BIAS_ONLY and training != "default" and options.get("routing") != "sigmoid":
                    continue  # no selection bias: the same run as the default one
                if method == "contiguous":
                    options.pop("calibration_tokens")
                for shared in [int(s) for s in parse_list(args.shared)]:
                    top_k = round(active * args.granularity) - shared
                    if top_k >= 1:
                        rows.append(Row(method, active, shared, top_k, budget,
                                        {**options, "granularity": args.granularity, "top_k": top_k,
                                         "shared_experts": shared}, training, args.granularity))
    wanted = set(parse_list(args.only))
    return [row for row in rows if not wanted or row.conversion_name in wanted or row.name in wanted]


def score(model_dir: Path, teacher, evaluation: dict, args, device) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from sparsify.eval.quality import measure_quality

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=teacher.dtype).to(device).eval()
    out = {}
    for name, text in evaluation.items():
        q = measure_quality(model, text, window=args.window, stride=args.window // 2, batch_size=args.batch_size, teacher=teacher)
        out[name] = {"perplexity": q["model"]["perplexity"], "teacher_perplexity": q["teacher"]["perplexity"],
                     "ratio": q["model"]["perplexity"] / q["teacher"]["perplexity"], **q["vs_teacher"]}
    if args.tasks:
        out["tasks"] = tasks(model, args)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def tasks(model, args) -> dict[str, Any]:
    try:
        import lm_eval  # noqa: F401 - only whether it is installed
    except ImportError:
        return {"not_run": "lm-evaluation-harness is not installed here"}
    from sparsify.eval.tasks import run_tasks
    from sparsify.sources import load_tokenizer

    return run_tasks(model, load_tokenizer(args.model), [args.tasks], task_paths=[], batch_size=args.batch_size, limit=None, num_fewshot=None)


def convert(row: Row, args, folder: Path) -> dict[str, Any]:
    from sparsify.upcycle import upcycle

    if (folder / "sparsify.json").exists():
        return json.loads((folder / "sparsify.json").read_text())["layout"]
    options = dict(row.options)
    started = time.perf_counter()
    result = upcycle(args.model, options.pop("to"), folder, overwrite=True, dtype=args.dtype, **options)
    layout = result.record["layout"]
    layout["conversion_seconds"] = time.perf_counter() - started
    return layout


def train(row: Row, args, converted: Path, folder: Path, calibration: str) -> dict[str, Any]:
    from sparsify.train.loop import train as train_model
    from sparsify.train.options import TrainOptions

    flags = {"data": calibration, "tokens": str(row.train_tokens), "batch_size": args.train_batch, "eval_every": 0,
             "checkpoint_every": args.checkpoint_every, **json.loads(args.train_flags), **TRAINING[row.training]}
    options = TrainOptions.of(**flags)
    run_dir = folder.with_name(folder.name + ".run")
    started = time.perf_counter()
    result = train_model(converted, options, output=folder, run_dir=run_dir, resume=run_dir.exists())
    return {"seconds": time.perf_counter() - started, "tokens_per_second": getattr(result, "tokens_per_second", None),
            "heldout_after": getattr(result, "after", None)}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        label = f"{row['method']} S={row['shared']}" if row["method"] != "prune" and not row["method"].startswith("prune") else row["method"]
        label += f" G={row['granularity']}" if row.get("granularity", 8) != 8 and not row["method"].startswith("prune") else ""
        label += f" +{row['training_setting']}" if row.get("training_setting", "default") != "default" else ""
        lines.setdefault(f"{label}, {row['train_tokens'] / 1e6:g}M tokens", []).append((row["active"], row["scores"]["valid"]["ratio"]))
    figure, axis = plt.subplots(figsize=(8.5, 5.5))
    colours = plt.get_cmap("tab20")
    methods = sorted({label.split(",")[0] for label in lines})
    for label, points in sorted(lines.items()):
        points.sort()
        trained = not label.endswith(" 0M tokens")  # untrained: solid circles; trained: dashed squares
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="s" if trained else "o", linestyle="--" if trained else "-",
                  color=colours(methods.index(label.split(",")[0]) % 20), label=label)
    axis.set_yscale("log")
    axis.set_ylim(0.95, 8)  # the usable range; the contiguous split's untrained points (x6 to x10^5) run off the top
    axis.axhline(1.0, color="grey", lw=0.8)
    axis.set_xlabel("active FFN fraction")
    axis.set_ylabel("valid perplexity / teacher's (log)")
    axis.set_title("SmolLM2-135M -> fine-grained MoE (G=8 unless named) vs static pruning")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--methods", default="contiguous,coactivation,prune")
    parser.add_argument("--active", default="0.25,0.5,0.75")
    parser.add_argument("--shared", default="0,1")
    parser.add_argument("--granularity", type=int, default=8)
    parser.add_argument("--train-tokens", default="0")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-flags", default="{}", help="More training options as JSON, e.g. '{\"lr\": 5e-4}'.")
    parser.add_argument("--training", default="default", help=f"Training settings to compare (comma-separated): {', '.join(TRAINING)}.")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--calibration-tokens", default="128k")
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--sets", default="tune,valid,ood", help="Texts to score; --tune scores only tune.")
    parser.add_argument("--tune", action="store_true", help="Score on the tune split only (choosing settings).")
    parser.add_argument("--only", default="", help="Row or conversion names to run (comma-separated).")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", default="sparsify_tiny")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--report-only", action="store_true", help="Write the JSON and PNG from WORKDIR/rows.jsonl (every row there), run nothing.")
    args = parser.parse_args()
    if args.report_only:
        rows = [json.loads(line) for line in (args.workdir / "rows.jsonl").read_text().splitlines()]
        report(args, rows, rows[0].get("device", "?") if rows else "?")
        return

    import torch

    from sparsify.option_values import parse_list
    from sparsify.sources import load_model, load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.workdir.mkdir(parents=True, exist_ok=True)
    calibration = str(args.data_dir / "corpus" / "train.jsonl.gz")
    teacher = load_model(args.model, dtype=dtype).to(device).eval()
    sets = ["tune"] if args.tune else parse_list(args.sets)
    evaluation = heldout_texts(args.data_dir, load_tokenizer(args.model), args.eval_tokens, sets)
    teacher_file = teacher_tasks_file(args)
    if args.tasks and not args.tune and not teacher_file.exists():  # the teacher's accuracy, beside which the rows' reads
        teacher_file.write_text(json.dumps(tasks(teacher, args)))
    log = args.workdir / "rows.jsonl"
    done = {json.loads(line)["name"]: json.loads(line) for line in log.read_text().splitlines()} if log.exists() else {}
    for row in plan_rows(args, calibration):
        if row.name in done:
            continue
        started = time.perf_counter()
        converted = args.workdir / row.conversion_name
        layout = convert(row, args, converted)
        trained = None
        scored = converted
        if row.train_tokens:
            scored = args.workdir / row.name.replace("@", "_at_")
            if not (scored / "config.json").exists():
                trained = train(row, args, converted, scored, calibration)
        entry = {"name": row.name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "method": row.method,
                 "active": row.active, "shared": row.shared, "top_k": row.top_k, "granularity": row.granularity,
                 "training_setting": row.training, "training_options": TRAINING[row.training],
                 "train_tokens": row.train_tokens, "options": row.options, "layout": {k: v for k, v in layout.items() if k != "calibration"},
                 "calibration": {k: v for k, v in (layout.get("calibration") or {}).items() if k != "layers"},
                 "training": trained, "scores": score(scored, teacher, evaluation, args, device), "seconds": time.perf_counter() - started}
        with log.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        done[row.name] = entry
        valid = entry["scores"].get("valid") or entry["scores"]["tune"]
        print(json.dumps({"row": row.name, "ratio": round(valid["ratio"], 4), "kl": round(valid["kl"], 4)}), flush=True)
    rows = [done[row.name] for row in plan_rows(args, calibration) if row.name in done]
    report(args, rows, torch.cuda.get_device_name() if device.type == "cuda" else "cpu")


def teacher_tasks_file(args) -> Path:
    """Where the teacher's task accuracy is kept in the workdir (computed once, read by the report)."""
    return args.workdir / "teacher_tasks.json"


def report(args, rows: list[dict[str, Any]], device: str) -> None:
    result = {"benchmark": "conversion_quality", "model": args.model, "device": device,
              "granularity": args.granularity, "eval_tokens": args.eval_tokens, "calibration_tokens": args.calibration_tokens,
              "train_batch": args.train_batch, "train_flags": json.loads(args.train_flags), "rows": rows}
    teacher_file = teacher_tasks_file(args)
    if teacher_file.exists():
        result["teacher_tasks"] = json.loads(teacher_file.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    scored = [row for row in rows if "valid" in row["scores"]]  # tuning rows (--tune) have the tune split only
    if args.plot and scored:
        try:
            plot(scored, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot")
    print(json.dumps({"rows": len(rows), "out": str(args.out)}))


if __name__ == "__main__":
    main()
