"""Self-speculative decoding from a trained skip model: acceptance and speed against the teacher.

    python bench/skip_speculative.py --model smollm2.gguf --data train.jsonl.gz --eval-data valid.jsonl.gz \
        --tokens 10M --target-skip 0.4 --thresholds 0.5,0.6,0.7,0.8 --draft-tokens 2,4 --work /tmp/spec --out spec.json

Trains a skip model as bench/skip_speed.py does (or reuses one: --reuse-trained), then for each draft
threshold and draft length decodes `--prompts` prompts of `--prompt-len` tokens cut from --eval-data
(no setting is chosen here) at batch 1, `--new-tokens` greedy tokens each, with
`speculative_generate` (plain transformers, eager), and the teacher with transformers' greedy
`generate` in the same process: the same engine class. Per setting: drafts accepted, tokens per
verification, the accepted-count histogram, tokens/s of the whole call (`decode_tokens_per_s`: the
prompt's prefill included, for both sides alike) and its ratio to the teacher's, the gates' skip rate at
the draft threshold (measured on the prompts), and the share of prompts whose tokens equal the teacher's greedy
tokens (bf16: a near-tie may flip a token; the CPU tests check identity in fp32). Prints JSON and
writes --out and a PNG beside it. The CUDA-graph engine path is not built yet, so the speeds here are
eager transformers', not the issue's target engine.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path


def prompts_from(path: str, tokenizer, count: int, length: int, new_tokens: int):
    import torch

    from sparsify.data import iter_documents

    prompts = []
    for text in iter_documents(path):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length + new_tokens:
            prompts.append(torch.tensor([ids[:length]]))
        if len(prompts) == count:
            break
    return prompts


def timed(run):
    import torch

    torch.cuda.synchronize() if torch.cuda.is_available() else None
    started = time.perf_counter()
    value = run()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return value, time.perf_counter() - started


def draft_skip_rate(model, prompt, threshold: float) -> float:
    """Share of gate decisions that skip on the prompt at the draft threshold (frozen gates excluded)."""
    import torch

    from sparsify.convert.skip.decisions import find_gates, gates_at_threshold, recording

    gates = [g for g in find_gates(model) if g.forced is None]
    with torch.no_grad(), gates_at_threshold(gates, threshold), recording(gates) as seen:
        model(input_ids=prompt)
    keep = torch.cat([k.float().flatten() for _, k in seen])
    return 1.0 - float(keep.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--tokens", default="10M")
    parser.add_argument("--target-skip", type=float, default=0.4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-flags", default='{"lora_rank": 0}',
                        help="More training options, as JSON. Default: gates only, so that every gate open is the dense model exactly (merged LoRA adapters would make the verifier the trained model).")
    parser.add_argument("--thresholds", default="0.5,0.6,0.7,0.8")
    parser.add_argument("--draft-tokens", default="2,4")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reuse-trained", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/skip-speculative"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    from sparsify.convert.skip.speculative import speculative_generate
    from sparsify.sources import load_model, load_tokenizer
    from sparsify.train.loop import train
    from sparsify.train.options import TrainOptions
    from sparsify.upcycle import upcycle

    report = {"benchmark": "skip_speculative", "engine": "transformers, eager (speculative_generate vs generate)",
              "args": {k: str(v) for k, v in vars(args).items()}}
    trained_folder = args.work / "skip-trained"
    if not args.reuse_trained:
        shutil.rmtree(args.work, ignore_errors=True)
        converted = upcycle(args.model, "skip", args.work / "skip").output
        options = TrainOptions.of(data=args.data, tokens=args.tokens, batch_size=args.batch_size, target_skip=args.target_skip,
                                  eval_every=0, checkpoint_every=0, **json.loads(args.train_flags))
        trained = train(converted, options, output=trained_folder)
        report["training"] = {"tokens": trained.tokens, "tokens_per_s": trained.tokens_per_second, "before": trained.before, "after": trained.after}
        print(json.dumps({"training": report["training"]}), flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    tokenizer = load_tokenizer(args.model)
    teacher = load_model(args.model, dtype=dtype).to(device).eval()
    model = load_model(str(trained_folder), dtype=dtype).to(device).eval()
    prompts = [p.to(device) for p in prompts_from(args.eval_data, tokenizer, args.prompts, args.prompt_len, args.new_tokens)]

    greedy = copy.deepcopy(teacher.generation_config)
    greedy.eos_token_id = None  # run the full length, as the speculative runs do (min_new_tokens would mask EOS instead)

    def teacher_greedy(prompt):
        with torch.no_grad():
            return teacher.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy, max_new_tokens=args.new_tokens,
                                    do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()

    teacher_greedy(prompts[0])  # warm-up
    reference, seconds = [], 0.0
    for prompt in prompts:
        tokens, took = timed(lambda: teacher_greedy(prompt))
        reference.append(tokens)
        seconds += took
    teacher_speed = len(prompts) * args.new_tokens / seconds
    report["teacher"] = {"decode_tokens_per_s": teacher_speed, "prompts": len(prompts), "new_tokens": args.new_tokens}
    print(json.dumps({"teacher_tokens_per_s": round(teacher_speed, 1)}), flush=True)
    rows = []
    for threshold in (float(t) for t in args.thresholds.split(",")):
        skip_rate = sum(draft_skip_rate(model, p, threshold) for p in prompts) / len(prompts)
        for k in (int(v) for v in args.draft_tokens.split(",")):
            speculative_generate(model, prompts[0], max_new_tokens=4, draft_tokens=k, draft_threshold=threshold)  # warm-up
            totals = {"rounds": 0, "drafted": 0, "accepted": 0, "row_rounds": 0}
            histogram, same, seconds = [0] * (k + 1), 0, 0.0
            for prompt, expected in zip(prompts, reference):
                result, took = timed(lambda: speculative_generate(model, prompt, max_new_tokens=args.new_tokens, draft_tokens=k,
                                                                  draft_threshold=threshold))
                seconds += took
                stats = result.stats
                for key in totals:
                    totals[key] += getattr(stats, key)
                histogram = [a + b for a, b in zip(histogram, stats.accepted_histogram)]
                same += int(result.sequences[0, prompt.shape[1]:].tolist() == expected)
            speed = len(prompts) * args.new_tokens / seconds
            row = {"draft_threshold": threshold, "draft_tokens": k, "draft_skip_rate": skip_rate,
                   "acceptance_rate": totals["accepted"] / totals["drafted"],
                   "tokens_per_verification": (totals["accepted"] + totals["row_rounds"]) / totals["row_rounds"],
                   "accepted_histogram": histogram, "verifications": totals["rounds"], "decode_tokens_per_s": speed,
                   "vs_teacher": speed / teacher_speed, "prompts_identical_to_teacher": same / len(prompts)}
            rows.append(row)
            print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
    report["rows"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for k in sorted({r["draft_tokens"] for r in rows}):
            mine = [r for r in rows if r["draft_tokens"] == k]
            axes[0].plot([r["draft_threshold"] for r in mine], [r["acceptance_rate"] for r in mine], marker="o", label=f"k={k}")
            axes[1].plot([r["draft_threshold"] for r in mine], [r["vs_teacher"] for r in mine], marker="o", label=f"k={k}")
        axes[0].set_ylabel("drafts accepted")
        axes[1].set_ylabel("decode speed / teacher's (eager)")
        for axis in axes:
            axis.set_xlabel("draft threshold")
            axis.legend(fontsize=8)
        figure.suptitle(f"self-speculative decoding, {report['device']}", fontsize=9)
        figure.tight_layout()
        figure.savefig(args.out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
