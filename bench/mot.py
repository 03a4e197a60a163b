"""Mixture of Tokens against direct router training, at equal total training tokens and equal active compute.

    python bench/mot.py --data-dir ../shared/data --workdir /tmp/mot --out bench/results/mot.json \
        --experts 16 --group-size 2 --tokens 10M [--mix-temperature 0.1] [--mot-start data] [--transition-share 0.1]
        [--only STAGES] [--report-only]

Rows, each on the corpus's train split (never valid or git's documentation), made with the product's calls:
  teacher              the dense model (SmolLM2-135M by default), scored as it is;
  mot                  `upcycle --to mot --experts E --group-size G --layers L --mix-temperature tau` (--mot-start data:
                       coactivation experts and a fitted controller from --calibration-tokens of the train split;
                       weights: contiguous slices, mean gate rows), trained on (1 - share) x T tokens
                       with `--grow-group-size 1:G` (controllers in full, LoRA, KL to the dense model at G = 1);
  transition-init      that MoT as a native MoE (`sparsify transition --tokens 0`): top-k = E / G, the switch itself;
  transition           the same trained on share x T tokens with the router engine (balance and z losses);
  direct-contiguous    `upcycle --to fine-moe --granularity E --top-k E/G` (neurons in order), routers trained on T tokens;
  direct-coactivation  the same with `--split coactivation` from calibration text (the best path of the conversion-quality work);
  speed                prefill and decode tokens/s of the rows' models against the teacher's under the same harness
                       (eval/cost.py): the CUDA-graph engine for the dense and native MoE models, transformers'
                       `generate` for those and the MoT (whose mixing needs a batch of G or more to save compute).
Every MoE row has E experts of d_ff / E neurons and top-k E / G in the same --layers as the MoT (the others dense):
the same active FFN compute (1/G of the dense FFN in those layers) as the MoT. Scored on tune (the train split's hashed held-out 1%), valid and ood (git's documentation): perplexity,
ratio to the teacher's, KL to the teacher. The MoT is scored in batches of --batch-size windows, so it mixes
windows of the same text (its batch dependence). The KL curve around the switch (the MoT's last steps, the
transition's first) goes in the report. Rows go to WORKDIR/rows.jsonl as they finish; a stage whose input is
not there yet waits for it, so two processes can share a workdir with disjoint --only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from staged_rows import RowLog, export_model, heldout_texts, wait_for

STAGES = ("teacher", "mot", "transition-init", "transition", "direct-contiguous", "direct-coactivation")
# Which rows' models each decode engine times (the graph engine runs dense and native MoE models, not the MoT).
SPEED_ENGINES = {"graph": ("teacher", "transition", "direct-contiguous", "direct-coactivation"), "hf": ("teacher", "mot", "transition")}
DIRECT_SPLITS = {"direct-contiguous": {"split": "contiguous"},
                 "direct-coactivation": {"split": "coactivation", "calibration_data": "{train}", "calibration": True}}


def folder(args, name: str) -> Path:
    return args.workdir / name


def token_budgets(args) -> tuple[int, int]:
    from sparsify.option_values import parse_count

    total = parse_count(args.tokens)
    transition = round(total * args.transition_share)
    return total - transition, transition


def training(args, tokens: int, extra: dict[str, Any]):
    from sparsify.train.options import TrainOptions

    flags = {"data": args.data, "tokens": str(tokens), "batch_size": args.train_batch, "checkpoint_every": args.checkpoint_every,
             "eval_every": 0, **json.loads(args.train_flags), **extra}
    return TrainOptions.of(**flags)


def make_teacher(args) -> dict[str, Any]:
    export_model(args.model, folder(args, "teacher"))
    return {}


def make_mot(args) -> dict[str, Any]:
    from sparsify.train.loop import train
    from sparsify.upcycle import upcycle

    wait_for(folder(args, "teacher"), "teacher")
    init = args.workdir / "mot-init"
    if not (init / "config.json").exists():
        start = ({"calibration_data": args.data, "calibration_tokens": args.calibration_tokens, "calibration_seq_len": args.calibration_seq_len}
                 if args.mot_start == "data" else {})
        upcycle(str(folder(args, "teacher")), "mot", init, experts=args.experts, group_size=args.group_size, layers=args.layers,
                mix_temperature=args.mix_temperature, **start)
    tokens, _ = token_budgets(args)
    run_dir = args.workdir / "mot.run"
    started = time.perf_counter()
    result = train(init, training(args, tokens, {"grow_group_size": f"1:{args.group_size}"}), output=folder(args, "mot"),
                   run_dir=run_dir, resume=(run_dir / "checkpoint").exists())
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "tokens_per_second": result.tokens_per_second}


def make_transition(args, trained: bool) -> dict[str, Any]:
    from sparsify.convert.mot.options import TransitionOptions
    from sparsify.convert.mot.transition import transition

    wait_for(folder(args, "mot"), "mot")
    _, tokens = token_budgets(args)
    name = "transition" if trained else "transition-init"
    run_dir = args.workdir / f"{name}.run"
    options = training(args, tokens, {"teacher": str(folder(args, "teacher"))}) if trained else None
    started = time.perf_counter()
    result = transition(folder(args, "mot"), folder(args, name), TransitionOptions(), options, run_dir=run_dir,
                        resume=(run_dir / "checkpoint").exists())
    made = {"seconds": time.perf_counter() - started, "top_k": result.top_k}
    if result.training is not None:
        made |= {"tokens": tokens, "tokens_per_second": result.training.tokens_per_second}
    return made


def make_direct(args, name: str) -> dict[str, Any]:
    from sparsify.train.loop import train
    from sparsify.upcycle import upcycle

    wait_for(folder(args, "teacher"), "teacher")
    init = args.workdir / f"{name}-init"
    options = {k: (v.format(train=args.data) if isinstance(v, str) else v) for k, v in DIRECT_SPLITS[name].items()}
    if options.pop("calibration", False):
        options |= {"calibration_tokens": args.calibration_tokens, "calibration_seq_len": args.calibration_seq_len}
    if not (init / "config.json").exists():
        upcycle(str(folder(args, "teacher")), "fine-moe", init, granularity=args.experts, top_k=args.experts // args.group_size,
                layers=args.layers, **options)
    from sparsify.option_values import parse_count

    tokens = parse_count(args.tokens)
    run_dir = args.workdir / f"{name}.run"
    started = time.perf_counter()
    result = train(init, training(args, tokens, {}), output=folder(args, name), run_dir=run_dir, resume=(run_dir / "checkpoint").exists())
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "tokens_per_second": result.tokens_per_second}


def score(model_dir: Path, teacher, evaluation: dict[str, Any], args) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from sparsify.eval.quality import measure_quality
    from sparsify.experts import use_fast_experts

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=teacher.dtype).to(teacher.device).eval()
    use_fast_experts(model)
    out = {}
    for name, text in evaluation.items():
        quality = measure_quality(model, text, window=args.window, stride=args.window // 2, batch_size=args.batch_size,
                                  teacher=None if model_dir == folder(args, "teacher") else teacher)
        out[name] = {"perplexity": quality["model"]["perplexity"], **({"ratio": quality["model"]["perplexity"] / quality["teacher"]["perplexity"],
                                                                       **quality["vs_teacher"]} if "teacher" in quality else {})}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def measure_speeds(args, sample) -> dict[str, Any]:
    """Prefill and decode tokens/s of each row's model under each engine, and each figure's ratio to the
    teacher's under the same engine and batch (above 1: faster than dense); models the run made only."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsify.eval.cost import measure_speed
    from sparsify.experts import use_fast_experts

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the code path, not a figure
    figures: dict[str, dict[str, Any]] = {}
    for engine, names in SPEED_ENGINES.items():
        for name in names:
            if not (folder(args, name) / "config.json").exists():
                continue
            model = AutoModelForCausalLM.from_pretrained(folder(args, name), dtype=torch.bfloat16).to(device).eval()
            use_fast_experts(model)
            speeds = measure_speed(model, sample, batch_sizes=[int(b) for b in args.speed_batches.split(",")], prompt_len=args.prompt_len,
                                   decode_tokens=args.decode_tokens, warmup=2, repeats=args.speed_repeats, pad_token_id=0, decode_engine=engine)
            figures.setdefault(engine, {})[name] = {batch: {key: entry[key] for key in entry if not key.endswith("_bytes")}
                                                    for batch, entry in speeds.items()}
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    for engine, rows in figures.items():
        dense = rows.get("teacher", {})
        for name, batches in rows.items():
            for batch, entry in batches.items():
                for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                    mine, base = entry.get(key, {}).get("median"), dense.get(batch, {}).get(key, {}).get("median")
                    if mine and base:
                        entry[key.replace("tokens_per_s", "vs_dense")] = mine / base
    return figures


def switch_curve(args, steps: int = 40) -> dict[str, Any]:
    """Training KL per step: the MoT's last `steps`, then the transition's first `steps`."""
    def log(run: str) -> list[dict[str, Any]]:
        path = args.workdir / run / "log.jsonl"
        entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [{"step": e["step"], "tokens": e["tokens"], "kl": e.get("kl"), "group_size": e.get("group_size")} for e in entries if "tokens_per_s" in e]

    return {"mot_end": log("mot.run")[-steps:], "transition_start": log("transition.run")[:steps]}


def report(args, rows: dict[str, dict[str, Any]]) -> None:
    result = {"benchmark": "mot", "model": args.model, "device": next((r.get("device") for r in rows.values()), "?"),
              "settings": {"experts": args.experts, "group_size": args.group_size, "layers": args.layers, "tokens": args.tokens,
                           "mix_temperature": args.mix_temperature, "mot_start": args.mot_start,
                           "transition_share": args.transition_share, "train_batch": args.train_batch, "eval_tokens": args.eval_tokens,
                           "window": args.window, "batch_size": args.batch_size, **json.loads(args.train_flags)},
              "rows": [rows[name] for name in STAGES if name in rows], "switch": switch_curve(args),
              "speed": rows.get("speed", {}).get("speed")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"table": {name: {t: {k: round(v, 4) for k, v in s.items() if k in ("perplexity", "ratio", "kl")}
                                       for t, s in rows[name]["scores"].items()} for name in rows if name in STAGES}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=2, help="G; the MoEs route top-k = experts / G.")
    parser.add_argument("--layers", default="all", help="The MoT's layers, and the direct MoEs' (the others stay dense FFNs).")
    parser.add_argument("--mix-temperature", type=float, default=1.0, help="The MoT's mixture temperature (choose it with bench/mot_start.py, on tune).")
    parser.add_argument("--mot-start", choices=("weights", "data"), default="data", help="How the MoT's experts and controllers start.")
    parser.add_argument("--tokens", default="10M", help="Training tokens of every path (the MoT path splits them with --transition-share).")
    parser.add_argument("--transition-share", type=float, default=0.1, help="Share of --tokens for transition tuning (the paper: ~10%%).")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--train-flags", default="{}", help="More training options for every row, as JSON.")
    parser.add_argument("--calibration-tokens", default="128k", help="Calibration text of the coactivation split and the MoT's data start (train split).")
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--speed-batches", default="1,16", help="speed: batch sizes.")
    parser.add_argument("--prompt-len", type=int, default=256, help="speed: prompt tokens per sequence.")
    parser.add_argument("--decode-tokens", type=int, default=32, help="speed: new tokens per decode timing.")
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="Stages to run (comma-separated), of: " + ", ".join(STAGES) + ", speed (last: it times "
                                                   "the models the workdir holds)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.data = str(args.data_dir / "corpus" / "train.jsonl.gz")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = RowLog(args.workdir)
    if args.report_only:
        report(args, rows.recorded())
        return
    import torch
    from transformers import AutoModelForCausalLM

    from sparsify.option_values import parse_list
    from sparsify.sources import load_tokenizer

    makers = {"teacher": make_teacher, "mot": make_mot, "transition-init": lambda a: make_transition(a, False),
              "transition": lambda a: make_transition(a, True), **{name: (lambda a, n=name: make_direct(a, n)) for name in DIRECT_SPLITS}}
    evaluation = heldout_texts(args.data_dir, load_tokenizer(args.model), args.eval_tokens)
    wanted = set(parse_list(args.only)) if args.only else {*STAGES, "speed"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = None
    for name in STAGES:
        if name in rows.recorded() or name not in wanted:
            continue
        started = time.perf_counter()
        made = makers[name](args)
        if teacher is None:
            wait_for(folder(args, "teacher"), "teacher")
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            teacher = AutoModelForCausalLM.from_pretrained(folder(args, "teacher"), dtype=dtype).to(device).eval()
        rows.append({"name": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "made": made,
                     "scores": score(folder(args, name), teacher, evaluation, args), "seconds": time.perf_counter() - started})
    if "speed" in wanted and "speed" not in rows.recorded() and torch.cuda.is_available():
        rows.append({"name": "speed", "device": torch.cuda.get_device_name(), "scores": {},
                     "speed": measure_speeds(args, evaluation["tune"].ids)})
    report(args, rows.recorded())


if __name__ == "__main__":
    main()
