"""Self-speculative decoding on the CUDA-graph engine: acceptance, cost per round and speed against the
teacher decoded by the same engine, in the same process.

    python bench/skip_speculative_graph.py --model smollm2.gguf --tune-data train.jsonl.gz \
        --eval-data valid.jsonl.gz --ood-data ood-git-doc.jsonl.gz --shares 0.1,0.2,0.3,0.4,0.5 --draft-tokens 1,2,3,4 --out spec.json
    python bench/skip_speculative_graph.py --shape 1b --shares 0.3,0.5,0.7,0.9 --draft-tokens 2,4 --out spec_1b.json

Real model: the checkpoint is converted to a skip model (its full path is the source exactly; static
draft plans need no gate training), static draft plans are searched on --tune-data (training text:
greedy elimination by top-1 agreement, convert/skip/draft_search.py), and each plan and draft length
decodes `--prompts` prompts from --eval-data and from --ood-data (the other domain) at batch 1:
drafts accepted, tokens per verification, decode tokens/s and its ratio to the teacher's graph
decode (both time the decode only, after the same prefill), and the share of prompts whose tokens
equal the teacher's greedy tokens on the same engine (bf16: verifying k + 1 tokens in one pass rounds
differently from k + 1 single steps, so a near-tie may flip; the engine's argmax reads fp32 logits,
so exact bf16 ties do not). With --on-policy N the plans are also searched on the teacher's greedy
continuations (N tokens) of the tune windows ("on-policy" rows). With --trained FOLDER the per-token
gates of a trained skip model are measured too, at --thresholds.

Draft head (convert/skip/draft_head.py): --draft-head FOLDER times a head saved by `sparsify
draft-head`; --train-head-steps N trains one on --tune-data first (on this GPU, into --work), its
scores and training record in the JSON. `--shares ""` skips the plan search, for head rows only:

    python bench/skip_speculative_graph.py --model smollm2.gguf --tune-data train.jsonl.gz --eval-data valid.jsonl.gz \
        --ood-data ood-git-doc.jsonl.gz --shares "" --train-head-steps 4000 --draft-tokens 2,3,4,5 --out head.json

--shape: random weights at that shape, acceptance meaningless; what is measured is the cost model: the
teacher's step, the draft step under a static plan dropping a share of sublayers (spread evenly over
depth), the round for each k, and the speedup each acceptance rate would give, E(a) / round.

Prints JSON lines, writes --out and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": True},  # a CPU smoke test of this script
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 49152, "tie_word_embeddings": True},
}


def windows(path: str, tokenizer, count: int, length: int, skip_docs: int = 0) -> list[torch.Tensor]:
    from sparsify.data import iter_documents

    found = []
    for index, text in enumerate(iter_documents(path)):
        if index < skip_docs:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            found.append(torch.tensor([ids[:length]]))
        if len(found) == count:
            break
    return found


def expected_tokens(accept: float, k: int) -> float:
    """Tokens per round when each draft is accepted with probability `accept`, independently."""
    return float(k + 1) if accept >= 1 else (1 - accept ** (k + 1)) / (1 - accept)


def teacher_decode(teacher, prompts, new_tokens: int, repeats: int) -> tuple[float, list[list[int]]]:
    from sparsify.engine.graph_decode import GraphDecoder, time_decode_steps

    seconds, tokens = [], []
    for prompt in prompts:
        times, _ = time_decode_steps(teacher, prompt, new_tokens, warmup=1, repeats=repeats)
        seconds.append(statistics.median(times))
        decoder = GraphDecoder(teacher, 1, prompt.shape[1] + new_tokens + 1)
        tokens.append(decoder.generate(prompt, new_tokens)[0, prompt.shape[1]:].tolist())
    return statistics.mean(seconds), tokens


def speculative_row(model, plan, k: int, prompts, reference, new_tokens: int, repeats: int, teacher_s: float, head=None) -> dict:
    from sparsify.engine.speculative_decode import SpeculativeDecoder, time_speculative_decode

    # One decoder (one captured round) serves every prompt: they share a length.
    decoder = SpeculativeDecoder(model, 1, max(p.shape[1] for p in prompts) + new_tokens, plan, k, head=head)
    seconds, accepted, drafted, rounds, same, first_diff, margins = [], 0, 0, 0, 0, [], []
    for prompt, expected in zip(prompts, reference, strict=True):
        timing = time_speculative_decode(model, prompt, new_tokens, plan, k, warmup=1, repeats=repeats, decoder=decoder, head=head)
        seconds.append(statistics.median(timing.seconds_per_token))
        result = decoder.generate(prompt, new_tokens)
        got = result.sequences[0, prompt.shape[1]:].tolist()
        same += int(got == expected)
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        first_diff.append(first)
        if first is not None:  # a near-tie the verify pass rounded the other way, or a real error: the teacher's margin says
            margins.append(teacher_margin(model, prompt, expected, first))
        accepted, drafted, rounds = accepted + result.stats.accepted, drafted + result.stats.drafted, rounds + result.stats.rounds
    per_token = statistics.mean(seconds)
    return {"draft_tokens": k, "acceptance_rate": accepted / drafted, "tokens_per_verification": (accepted + rounds) / rounds,
            "ms_per_token": per_token * 1e3, "ms_per_round": per_token * 1e3 * (accepted + rounds) / rounds,
            "vs_teacher": teacher_s / per_token, "prompts_identical_to_teacher": same / len(prompts), "first_difference": first_diff,
            "teacher_logit_margin_at_difference": margins}


@torch.no_grad()
def teacher_margin(model, prompt: torch.Tensor, expected: list[int], position: int) -> float:
    """The teacher's top-1 minus top-2 logit where the speculative tokens first left its greedy ones
    (model with every gate open = the teacher); near 0: a tie that rounding decides."""
    from sparsify.engine.speculative_decode import TEACHER
    from sparsify.convert.skip.draft_plan import drafting

    ids = torch.cat([prompt, torch.tensor([expected[:position]], device=prompt.device, dtype=prompt.dtype)], dim=1)
    with drafting(model, TEACHER):
        top = model(input_ids=ids).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def emit(args, record: dict) -> None:
    """Print a row and append it to the JSON-lines file beside --out, so a cut-off run keeps its rows."""
    line = json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in record.items()})
    print(line, flush=True)
    with args.out.with_suffix(".rows.jsonl").open("a") as rows:
        rows.write(line + "\n")


def draft_step_ms(model, plan, prompt, new_tokens: int, repeats: int) -> float:
    """One draft step on its own: the engine under the plan, statically skipped sublayers costing nothing."""
    from sparsify.convert.skip.draft_plan import drafting
    from sparsify.engine.graph_decode import time_decode_steps

    with drafting(model, plan):
        times, _ = time_decode_steps(model, prompt, new_tokens, warmup=1, repeats=repeats, skipped_kv=False)
    return statistics.median(times) * 1e3


def curve_line(search) -> list[tuple]:
    """(sublayers dropped, agreement, KL) after each step of a plan search, rounded for a JSON line."""
    return [(step["dropped"], round(step["agreement"], 4), round(step["kl"], 4)) for step in search.curve()]


def real_model(args, report: dict) -> list[dict]:
    from sparsify.convert.skip.draft_plan import DraftPlan
    from sparsify.convert.skip.draft_search import search_draft_plan, teacher_continuations
    from sparsify.sources import load_model, load_tokenizer
    from sparsify.upcycle import upcycle

    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: fp32, so identity is exact
    teacher = load_model(args.model, dtype=dtype).to(device).eval()
    folder = upcycle(args.model, "skip", args.work / "skip").output
    model = load_model(str(folder), dtype=dtype).to(device).eval()
    sets = {"valid": [p.to(device) for p in windows(args.eval_data, tokenizer, args.prompts, args.prompt_len)]}
    if args.ood_data:
        sets["other_domain"] = [p.to(device) for p in windows(args.ood_data, tokenizer, args.prompts, args.prompt_len)]
    references = {}
    for name, prompts in sets.items():
        teacher_s, references[name] = teacher_decode(teacher, prompts, args.new_tokens, args.repeats)
        report.setdefault("teacher_ms_per_token", {})[name] = teacher_s * 1e3
    emit(args, {"teacher_ms_per_token": report["teacher_ms_per_token"]})
    rows = head_rows(args, model, folder, sets, references, report)
    shares = [float(s) for s in args.shares.split(",") if s]
    if not shares:
        return rows
    tune = [w.to(device) for w in windows(args.tune_data, tokenizer, args.search_windows, args.search_len)]
    tune = [torch.cat(tune[i:i + 4]) for i in range(0, len(tune), 4)]
    search = search_draft_plan(model, tune, max(float(s) for s in args.shares.split(",")),
                               progress=lambda done, total: print(json.dumps({"search": f"{done}/{total}"}), flush=True))
    report["search"] = {"tune_tokens": search.tune_tokens, "curve": search.curve()}
    emit(args, {"search_curve": curve_line(search), "order": list(search.steps[-1].skip)})
    plans = {f"static {float(s):.2f}": search.plan_for(float(s)) for s in args.shares.split(",")}
    if args.on_policy:  # the same windows as prompts, scored on the teacher's own continuations of them
        continued = teacher_continuations(model, tune, args.on_policy)
        on_policy = search_draft_plan(model, continued, max(float(s) for s in args.shares.split(",")), scored_from=args.search_len - 1)
        report["search_on_policy"] = {"tune_tokens": on_policy.tune_tokens, "curve": on_policy.curve()}
        emit(args, {"search_on_policy_curve": curve_line(on_policy), "order": list(on_policy.steps[-1].skip)})
        plans.update({f"on-policy {float(s):.2f}": on_policy.plan_for(float(s)) for s in args.shares.split(",")})
    if args.trained:
        model_gates = load_model(args.trained, dtype=dtype).to(device).eval()
        plans.update({f"per-token t={float(t):g}": (DraftPlan.per_token(float(t)), model_gates) for t in args.thresholds.split(",")})
    for label, plan in plans.items():
        drafter = model
        if isinstance(plan, tuple):
            plan, drafter = plan
        step_ms = draft_step_ms(drafter, plan, sets["valid"][0], args.new_tokens, args.repeats)
        for k in (int(v) for v in args.draft_tokens.split(",")):
            for name, prompts in sets.items():
                row = {"plan": label, "skipped": list(plan.skip), "prompts": name, "draft_step_ms": step_ms,
                       **speculative_row(drafter, plan, k, prompts, references[name], args.new_tokens, args.repeats,
                                         report["teacher_ms_per_token"][name] / 1e3)}
                rows.append(row)
                emit(args, {key: v for key, v in row.items() if key != "skipped"})
    return rows


def head_rows(args, model, folder: Path, sets, references, report: dict) -> list[dict]:
    """Rows for a draft head: --draft-head's, or one trained here on --tune-data (--train-head-steps)."""
    from sparsify.convert.skip.draft_head import DraftHead, find_draft_head
    from sparsify.convert.skip.draft_head_copy import write_draft_head_copy
    from sparsify.convert.skip.draft_head_training import DraftHeadOptions

    source = args.draft_head
    if args.train_head_steps:
        options = DraftHeadOptions(steps=args.train_head_steps, batch_size=args.head_batch, window_len=args.head_window,
                                   depth=args.head_depth, lr=args.head_lr, feature_weight=args.head_feature_weight,
                                   feature_layers=tuple(int(v) for v in args.head_feature_layers.split(",") if v))
        started = time.time()
        copy = write_draft_head_copy(folder, args.work / "with-head", args.tune_data, options, device=args.device, overwrite=True,
                                     fit_on=args.head_fit_on,
                                     on_step=lambda step, total, loss: step % 100 == 0 and print(
                                         json.dumps({"head_step": step, "loss": round(loss, 4), "s": round(time.time() - started, 1)}), flush=True))
        report["draft_head_training"] = copy.fit.record()
        emit(args, {"draft_head_training": {k: v for k, v in copy.fit.record().items() if k != "loss_by_tenth"}})
        source = copy.output
    if source is None:
        return []
    found = find_draft_head(source) or Path(source)
    head = DraftHead.load(found, model)
    rows = []
    for k in (int(v) for v in args.draft_tokens.split(",")):
        for name, prompts in sets.items():
            row = {"plan": "draft head", "skipped": [], "prompts": name,
                   **speculative_row(model, None, k, prompts, references[name], args.new_tokens, args.repeats,
                                     report["teacher_ms_per_token"][name] / 1e3, head=head)}
            rows.append(row)
            emit(args, {key: v for key, v in row.items() if key != "skipped"})
    return rows


def random_shape(args, report: dict) -> list[dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    import sparsify  # noqa: F401 - registers SkipForCausalLM
    from sparsify.convert.skip.draft_plan import DraftPlan
    from sparsify.engine.graph_decode import time_decode_steps
    from sparsify.upcycle import upcycle

    device = torch.device(args.device)
    config = AutoConfig.for_model("llama", **SHAPES[args.shape])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(args.work / "dense")
    upcycle(str(args.work / "dense"), "skip", args.work / "skip")
    teacher = AutoModelForCausalLM.from_pretrained(args.work / "dense", dtype=torch.bfloat16).to(device).eval()
    model = AutoModelForCausalLM.from_pretrained(args.work / "skip", dtype=torch.bfloat16).to(device).eval()
    prompt = torch.randint(0, 4000, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    times, _ = time_decode_steps(teacher, prompt, args.new_tokens, warmup=2, repeats=args.repeats)
    teacher_ms = statistics.median(times) * 1e3
    report["teacher_ms_per_token"] = teacher_ms
    keys = [f"{layer}.{sublayer}" for layer in range(config.num_hidden_layers) for sublayer in ("attention", "ffn")]
    rows = []
    for share in (float(s) for s in args.shares.split(",")):
        count = round(share * len(keys))
        chosen = tuple(keys[round(i * len(keys) / count)] for i in range(count)) if count else ()  # spread over depth
        plan = DraftPlan(chosen)
        step_ms = draft_step_ms(model, plan, prompt, args.new_tokens, args.repeats)
        for k in (int(v) for v in args.draft_tokens.split(",")):
            row = {"share": share, "draft_step_ms": step_ms, "draft_step_vs_teacher": step_ms / teacher_ms,
                   **speculative_row(model, plan, k, [prompt], [[0] * args.new_tokens], args.new_tokens, args.repeats, teacher_ms / 1e3)}
            round_vs_teacher = row["ms_per_round"] / teacher_ms
            row.update(round_vs_teacher=round_vs_teacher, verify_vs_teacher=round_vs_teacher - k * row["draft_step_vs_teacher"],
                       predicted_speedup={f"{a:.2f}": expected_tokens(a, k) / round_vs_teacher for a in (0.6, 0.7, 0.8, 0.9, 1.0)},
                       acceptance_note="random weights: acceptance and identity are not meaningful")
            for drop in ("prompts_identical_to_teacher", "first_difference", "teacher_logit_margin_at_difference"):
                row.pop(drop)
            rows.append(row)
            emit(args, row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    heads = [r for r in rows if r.get("plan") == "draft head" and r.get("prompts", "valid") == "valid"]
    if heads and len(heads) == len([r for r in rows if r.get("prompts", "valid") == "valid"]):  # head rows only: against k
        axes[0].plot([r["draft_tokens"] for r in heads], [r["acceptance_rate"] for r in heads], marker="o", label="draft head")
        axes[1].plot([r["draft_tokens"] for r in heads], [r["vs_teacher"] for r in heads], marker="o", label="draft head")
        axes[0].set_ylabel("drafts accepted (valid)")
        axes[1].set_ylabel("decode speed / teacher's (same engine)")
        axes[1].axhline(1.0, color="grey", lw=0.8)
        for axis in axes:
            axis.set_xlabel("draft tokens per round (k)")
            axis.legend(fontsize=8)
        figure.suptitle(title, fontsize=9)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        return
    rows = [r for r in rows if r.get("plan") != "draft head"]  # mixed runs: the head's rows are in the JSON
    for k in sorted({r["draft_tokens"] for r in rows}):
        mine = [r for r in rows if r["draft_tokens"] == k and r.get("prompts", "valid") == "valid" and "share" not in r]
        if mine:
            axes[0].plot([len(r["skipped"]) for r in mine], [r["acceptance_rate"] for r in mine], marker="o", label=f"k={k}")
            axes[1].plot([len(r["skipped"]) for r in mine], [r["vs_teacher"] for r in mine], marker="o", label=f"k={k}")
        shaped = [r for r in rows if r["draft_tokens"] == k and "share" in r]
        if shaped:
            axes[0].plot([r["share"] for r in shaped], [r["round_vs_teacher"] for r in shaped], marker="o", label=f"k={k}")
            axes[1].plot([r["share"] for r in shaped], [r["predicted_speedup"]["0.80"] for r in shaped], marker="o", label=f"k={k}")
    shaped = any("share" in r for r in rows)
    axes[0].set_ylabel("round cost / teacher step" if shaped else "drafts accepted (valid)")
    axes[1].set_ylabel("speedup if 80% accepted" if shaped else "decode speed / teacher's (same engine)")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    for axis in axes:
        axis.set_xlabel("share of sublayers the draft drops" if shaped else "sublayers the draft drops (static plan)")
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights at this shape: the cost model only")
    parser.add_argument("--tune-data", help="training text the static plans are searched on")
    parser.add_argument("--eval-data", help="held-out prompts")
    parser.add_argument("--ood-data", help="other-domain prompts")
    parser.add_argument("--trained", help="a trained skip model folder: measure its per-token gates too")
    parser.add_argument("--thresholds", default="0.5,0.6")
    parser.add_argument("--shares", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--draft-tokens", default="1,2,3,4")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--search-windows", type=int, default=16)
    parser.add_argument("--search-len", type=int, default=256)
    parser.add_argument("--on-policy", type=int, default=0,
                        help="also search on the teacher's greedy continuations (this many tokens) of the tune windows")
    parser.add_argument("--draft-head", type=Path, help="a model folder carrying a draft head (sparsify draft-head): time it too")
    parser.add_argument("--train-head-steps", type=int, default=0, help="train a draft head on --tune-data first (0: none)")
    parser.add_argument("--head-batch", type=int, default=8)
    parser.add_argument("--head-window", type=int, default=256)
    parser.add_argument("--head-depth", type=int, default=2)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--head-fit-on", choices=("corpus", "teacher"), default="corpus")
    parser.add_argument("--head-feature-weight", type=float, default=1.0)
    parser.add_argument("--head-feature-layers", default="", help="teacher layers the head reads, e.g. 2,15,29 (empty: the top one)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/skip-speculative-graph"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu: an eager smoke test of this script, no timing worth reading")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark times the CUDA-graph engine: run it on a GPU machine")
    if args.shape is None and not (args.tune_data and args.eval_data):
        raise SystemExit("a real model needs --tune-data (training text) and --eval-data")
    shutil.rmtree(args.work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".rows.jsonl").unlink(missing_ok=True)
    report = {"benchmark": "skip_speculative_graph", "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "batch": 1,
              "args": {k: str(v) for k, v in vars(args).items()}}
    report["rows"] = random_shape(args, report) if args.shape else real_model(args, report)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report["rows"], args.out.with_suffix(".png"), f"self-speculative decoding, static-cache engine ({'CUDA graphs' if args.device == 'cuda' else 'eager, timings not meaningful'}), {report['device']}, "
                                                       f"{args.shape + ' random weights' if args.shape else args.model}")


if __name__ == "__main__":
    main()
