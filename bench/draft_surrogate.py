"""How much teacher agreement a cheap draft-only stand-in for each dropped sublayer buys back.

A static draft plan drops sublayers outright. The probe here replaces each dropped sublayer with an
affine map of its normalised input, Delta h ~= W norm(h) + b, fitted in closed form (ridge) to the
sublayer's output on training text with every sublayer running. It changes nothing of the verifier:
the map is a draft-only parameter. What it costs in the engine (one GEMV per dropped sublayer) is not
measured here; what is measured is teacher-forced top-1 agreement and KL to the teacher, on tune text
(a later part of the training file than the fit and the plan search used), for the plan alone and the
plan with stand-ins, at each share. Dense Llama-family models; CPU is enough.

    python bench/draft_surrogate.py --model smollm2.gguf --data train.jsonl.gz \\
        --order bench/results/skip_speculative_graph_smollm2_cpu/smollm2_cpu.rows.jsonl --shares 0.1,0.2,0.3,0.5 --out s.json

--order: the rows file of bench/skip_speculative_graph.py, whose search line lists the sublayers in
the order the greedy search dropped them (a plan of share f is its first round(f * 2L) entries).
Prints JSON lines and writes --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def sublayer_output(layer, sublayer: str, normed: torch.Tensor, rope) -> torch.Tensor:
    if sublayer == "attention":
        return layer.self_attn(hidden_states=normed, position_embeddings=rope, attention_mask=None)[0]  # causal (SDPA, no mask)
    return layer.mlp(normed)


@torch.no_grad()
def forward(model, ids: torch.Tensor, dropped: set[str], stand_ins: dict[str, tuple[torch.Tensor, torch.Tensor]],
            record: dict[str, list] | None = None) -> torch.Tensor:
    """Logits with the `dropped` sublayers skipped (or replaced by their stand-in); `record` collects
    every sublayer's (normed input, output) with all running."""
    decoder = model.model
    hidden = decoder.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    rope = decoder.rotary_emb(hidden, positions)
    for index, layer in enumerate(decoder.layers):
        for sublayer, norm in (("attention", layer.input_layernorm), ("ffn", layer.post_attention_layernorm)):
            key = f"{index}.{sublayer}"
            normed = norm(hidden)
            if key in dropped:
                if key in stand_ins:
                    weight, bias = stand_ins[key]
                    hidden = hidden + normed @ weight + bias
                continue
            out = sublayer_output(layer, sublayer, normed, rope)
            if record is not None:
                record.setdefault(key, []).append((normed.flatten(0, 1), out.flatten(0, 1)))
            hidden = hidden + out
    return model.lm_head(decoder.norm(hidden))


def ridge(inputs: torch.Tensor, targets: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b minimising |targets - inputs W - b|^2 + strength * trace-scaled |W|^2, in float64."""
    x, y = inputs.double(), targets.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    x, y = x - mean_x, y - mean_y
    gram = x.T @ x
    gram += strength * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram, x.T @ y)
    return weight.float(), (mean_y - mean_x @ weight).float()


def scores(model, batches, teacher, dropped, stand_ins) -> dict[str, float]:
    agree = kl = count = 0.0
    for ids, (choice, log_p) in zip(batches, teacher, strict=True):
        log_q = F.log_softmax(forward(model, ids, dropped, stand_ins).float(), -1)
        agree += float((log_q.argmax(-1) == choice).sum())
        kl += float((log_p.exp() * (log_p - log_q)).sum())
        count += choice.numel()
    return {"agreement": agree / count, "kl": kl / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="training text: the fit and the tune scores come from it")
    parser.add_argument("--order", required=True, type=Path)
    parser.add_argument("--shares", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--fit-windows", type=int, default=16)
    parser.add_argument("--tune-windows", type=int, default=8)
    parser.add_argument("--window-len", type=int, default=256)
    parser.add_argument("--ridge", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from skip_speculative_graph import windows

    from sparsify.sources import load_model, load_tokenizer

    order = next(json.loads(line)["order"] for line in args.order.read_text().splitlines() if '"order"' in line)
    model, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
    sublayers = 2 * model.config.num_hidden_layers
    # The plan search read the first documents; the fit skips 100 documents, tune text 400.
    fit = windows(args.data, tokenizer, args.fit_windows, args.window_len, skip_docs=100)
    tune = windows(args.data, tokenizer, args.tune_windows, args.window_len, skip_docs=400)
    record: dict[str, list] = {}
    for ids in fit:
        forward(model, ids, set(), {}, record)
    teacher = []
    for ids in tune:
        log_p = F.log_softmax(forward(model, ids, set(), {}).float(), -1)
        teacher.append((log_p.argmax(-1), log_p))
    rows = []
    for share in (float(s) for s in args.shares.split(",")):
        dropped = set(order[: round(share * sublayers)])
        stand_ins = {key: ridge(torch.cat([x for x, _ in record[key]]), torch.cat([y for _, y in record[key]]), args.ridge)
                     for key in dropped}
        row = {"share": share, "dropped": len(dropped), "plan_alone": scores(model, tune, teacher, dropped, {}),
               "with_stand_ins": scores(model, tune, teacher, dropped, stand_ins)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"benchmark": "draft_surrogate", "args": {k: str(v) for k, v in vars(args).items()},
                                    "fit_tokens": sum(w.numel() for w in fit), "tune_tokens": sum(w.numel() for w in tune),
                                    "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
