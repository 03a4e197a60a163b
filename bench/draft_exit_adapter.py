"""How much teacher agreement an early exit plus one trained adapter layer reaches as a draft.

The static plans of bench/skip_speculative_graph.py keep too many sublayers to be cheap: at batch 1
a draft step costs about the share of sublayers it keeps, and SmolLM2-135M's best untrained plan
that drops half of them agrees with the teacher on about a quarter of the tokens. A Kangaroo-style
draft (Liu et al., 2024) is cheap by construction: the teacher's first L layers, then one adapter
layer of the draft's own, the final norm and the teacher's (frozen, tied) head:

    draft(x) = head(norm'(adapter(layers[:L](x))))

The adapter starts as a copy of the teacher's layer `--init-from` (default: layer L) and the norm as
the final norm; both are trained (AdamW) with cross-entropy to the teacher's greedy token, which is
what greedy acceptance asks of a draft. The first L layers are the teacher's own, so in decoding
their K/V would be the teacher's; only the adapter would need a cache of its own. Nothing here is
wired into the engine: this probe asks whether the route can reach the acceptance that 1.5x needs
(docs/results.md: about 80% with 80% of the sublayers dropped) before building it.

Data: training windows for the fit (documents from --fit-skip on) and tune windows (later train text,
documents from --tune-skip on) for the scores: never the held-out or other-domain text. Reported per
exit layer: teacher-forced top-1 agreement and the draft's cost in layers, exit alone (no adapter),
adapter at its initialisation, adapter trained. CPU is enough (fp32).

    python bench/draft_exit_adapter.py --model smollm2.gguf --data train.jsonl.gz --exits 6,10 --out a.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def teacher_features(model, ids: torch.Tensor, exits: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The hidden states entering layer L for each exit L, and the teacher's greedy tokens."""
    decoder = model.model
    hidden = decoder.embed_tokens(ids)
    rope = decoder.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
    kept = {}
    for index, layer in enumerate(decoder.layers):
        if index in exits:
            kept[index] = hidden.clone()
        hidden = layer(hidden, position_embeddings=rope, attention_mask=None)  # causal (SDPA, no mask)
    return kept, model.lm_head(decoder.norm(hidden)).argmax(-1)


def draft_logits(model, adapter, norm, features: torch.Tensor) -> torch.Tensor:
    rope = model.model.rotary_emb(features, torch.arange(features.shape[1])[None])
    hidden = adapter(features, position_embeddings=rope, attention_mask=None) if adapter is not None else features
    return model.lm_head(norm(hidden))


@torch.no_grad()
def agreement(model, adapter, norm, features: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    hits = total = 0
    for x, y in zip(features, targets, strict=True):
        hits += int((draft_logits(model, adapter, norm, x).argmax(-1) == y).sum())
        total += y.numel()
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="training text: the fit and the tune scores both come from it")
    parser.add_argument("--exits", default="6,10", help="exit layers L: the draft runs the teacher's layers 0..L-1")
    parser.add_argument("--init-from", default="next", help="the teacher layer the adapter starts as: next (layer L), last, or an index")
    parser.add_argument("--fit-windows", type=int, default=256)
    parser.add_argument("--tune-windows", type=int, default=16)
    parser.add_argument("--window-len", type=int, default=128)
    parser.add_argument("--fit-skip", type=int, default=2000, help="documents of --data the fit skips")
    parser.add_argument("--tune-skip", type=int, default=400, help="documents of --data the tune windows skip")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from skip_speculative_graph import windows

    from sparsify.sources import load_model, load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype=torch.float32).eval(), load_tokenizer(args.model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = model.config.num_hidden_layers
    exits = [int(v) for v in args.exits.split(",")]
    started = time.time()
    fit = torch.cat(windows(args.data, tokenizer, args.fit_windows, args.window_len, skip_docs=args.fit_skip))
    tune = windows(args.data, tokenizer, args.tune_windows, args.window_len, skip_docs=args.tune_skip)
    fit_features: dict[int, list[torch.Tensor]] = {L: [] for L in exits}
    fit_targets = []
    for chunk in fit.split(args.batch):
        kept, target = teacher_features(model, chunk, exits)
        for L in exits:
            fit_features[L].append(kept[L])
        fit_targets.append(target)
    tune_features: dict[int, list[torch.Tensor]] = {L: [] for L in exits}
    tune_targets = []
    for ids in tune:
        kept, target = teacher_features(model, ids, exits)
        for L in exits:
            tune_features[L].append(kept[L])
        tune_targets.append(target)
    print(json.dumps({"teacher_pass_s": round(time.time() - started, 1), "fit_tokens": fit.numel(),
                      "tune_tokens": sum(t.numel() for t in tune)}), flush=True)

    rows = []
    for L in exits:
        init_from = {"next": L, "last": layers - 1}.get(args.init_from) if args.init_from in ("next", "last") else int(args.init_from)
        adapter = copy.deepcopy(model.model.layers[init_from]).train()
        norm = copy.deepcopy(model.model.norm).train()
        trained = [p for module in (adapter, norm) for p in module.parameters()]
        for parameter in trained:
            parameter.requires_grad_(True)
        row = {"exit": L, "adapter_from_layer": init_from, "draft_layers": L + 1, "cost_share_of_layers": (L + 1) / layers,
               "agreement_exit_alone": agreement(model, None, model.model.norm, tune_features[L], tune_targets),
               "agreement_adapter_init": agreement(model, adapter, norm, tune_features[L], tune_targets)}
        optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
        batches = list(zip(fit_features[L], fit_targets, strict=True))
        started, losses = time.time(), []
        for step in range(args.steps):
            x, y = batches[step % len(batches)]
            lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + torch.cos(torch.tensor(step / args.steps * torch.pi)).item())
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(draft_logits(model, adapter, norm, x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            losses.append(loss.item())
            if (step + 1) % 25 == 0:
                print(json.dumps({"exit": L, "step": step + 1, "loss": round(sum(losses[-25:]) / 25, 4),
                                  "s": round(time.time() - started, 1)}), flush=True)
        adapter.eval()
        row.update({"agreement_adapter_trained": agreement(model, adapter, norm, tune_features[L], tune_targets),
                    "train_steps": args.steps, "train_tokens_seen": args.steps * args.batch * args.window_len,
                    "train_s": round(time.time() - started, 1)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"benchmark": "draft_exit_adapter", "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
