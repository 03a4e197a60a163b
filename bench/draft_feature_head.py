"""How many of the teacher's greedy tokens a one-layer draft on the teacher's own top features gets.

The exit adapter (bench/draft_exit_adapter.py) drafts from the teacher's early layers and tops out near
35% agreement on SmolLM2-135M at a quarter of a step: the early layers of a 30-layer model know too
little. A feature-level draft (EAGLE, Li et al., 2024) starts instead from the last thing the verifier
already computed, the top hidden state h[p-1] that produced the token x[p]:

    f[p] = layer(fuse([h[p-1], embed(x[p])]))        draft token x[p+1] = argmax head(norm(f[p]))

and chains on its own output: the next draft step reads f[p] where the teacher's h[p] would be. It
costs one decoder layer, one small GEMM and the head, about a tenth of a step at batch 1, so by the
cost model of docs/results.md it pays 1.5x near 60% per-token acceptance where a static plan needs
80% at 80% of the sublayers dropped.

The layer starts as a copy of the teacher's last layer, `fuse` as [I | I]; the teacher's final norm
and tied head are shared and frozen. Training is teacher-forced on training windows with the losses
of EAGLE (cross-entropy to the teacher's greedy token plus a smooth-L1 pull of f[p] to h[p]), and
with --train-depth D > 1 also on the draft's own chains up to depth D (each depth reads the depth
before it, as decoding does), so a chain is trained the way it is used.

Scores come from tune text only (later train documents, never valid or the other-domain text):
  - agreement_depth1: teacher-forced top-1 agreement of the first draft on corpus text;
  - on the teacher's own greedy continuations of tune prompts, the text a draft meets when decoding:
    accept_rate[j], the share of chains whose first j drafts are all the teacher's tokens, and the mean
    accepted drafts per round for each draft length k.

The chains of every start position run at once: depth j of the chain that starts at p sits at
position p + j - 1 and attends to the teacher-forced items up to p and to its own chain, through a
block mask, so one layer forward per depth scores them all.

    python bench/draft_feature_head.py --model smollm2.gguf --data train.jsonl.gz --out head.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class FeatureHead(nn.Module):
    """fuse([h, embed(x)]) -> one decoder layer; the teacher's embedding, norm and head are shared."""

    def __init__(self, model, init_from: int):
        super().__init__()
        width = model.config.hidden_size
        self.fuse = nn.Linear(2 * width, width, bias=False)
        with torch.no_grad():
            self.fuse.weight.copy_(torch.cat([torch.eye(width), torch.eye(width)], dim=1))
        self.layer = copy.deepcopy(model.model.layers[init_from])
        self.embed, self.rotary = model.model.embed_tokens, model.model.rotary_emb

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.fuse(torch.cat([features, self.embed(tokens)], dim=-1))
        rope = self.rotary(hidden, positions[None])
        return self.layer(hidden, position_embeddings=rope, attention_mask=mask)


def chain_mask(rows: int, depth: int) -> torch.Tensor:
    """(1, 1, depth*rows, depth*rows) additive mask: item (j, p) sees depth-1 items (0, s <= p) and (i, p) for
    1 <= i <= j, which is what the draft's cache holds at depth j of the chain that starts at p."""
    row = torch.arange(rows)
    first = row[None, :] <= row[:, None]
    same = torch.eye(rows, dtype=torch.bool)
    blocks = [[first if i == 0 else (same if i <= j else torch.zeros_like(same)) for i in range(depth)]
              for j in range(depth)]
    allowed = torch.cat([torch.cat(line, dim=1) for line in blocks], dim=0)[None, None]
    # additive, not bool: the eager attention adds the mask to its scores
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def run_chains(head: FeatureHead, features: torch.Tensor, tokens: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Draft features of depth 1..`depth` for every start p = 1..T-1 of each (B, T) window.

    Depth 1 at p reads the teacher's (h[p-1], x[p]); depth j reads the depth j-1 output and x[p+j-1],
    the token there (on the teacher's own continuation that is the token the chain must have drafted to
    get this far). Returns depth tensors (B, T-1-(j-1), width): row p-1 holds the chain from p.
    """
    rows = tokens.shape[1] - 1
    outputs: list[torch.Tensor] = []
    for j in range(depth):
        items = rows - j  # the chains that still have a target inside the window
        inputs_f = [features[:, :rows]] + [outputs[i][:, : rows - j] for i in range(j)]
        inputs_x = [tokens[:, 1 + i: 1 + i + rows - i][:, : rows - j] for i in range(j + 1)]
        inputs_f[0] = inputs_f[0][:, :items]
        positions = torch.cat([torch.arange(items) + 1 + i for i in range(j + 1)])
        out = head(torch.cat(inputs_f, dim=1), torch.cat(inputs_x, dim=1), positions,
                   None if j == 0 else chain_mask(items, j + 1))
        outputs.append(out[:, j * items:])
    return outputs


def logits_of(model, features: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(features))


@torch.no_grad()
def teacher_pass(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top hidden state (before the final norm) and greedy token at every position."""
    decoder = model.model  # its own forward returns the state after the final norm
    hidden = decoder.embed_tokens(ids)
    rope = decoder.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
    for layer in decoder.layers:
        hidden = layer(hidden, position_embeddings=rope, attention_mask=None)  # causal (SDPA, no mask)
    return hidden, logits_of(model, hidden).argmax(-1)


@torch.no_grad()
def chain_acceptance(model, head, sequences, depth: int, scored_from: int) -> dict:
    """Per depth, the share of chains starting in the continuation whose first j drafts all match."""
    matched_prefix = torch.zeros(depth)
    chains = 0
    for hidden, greedy, ids in sequences:
        outputs = run_chains(head, hidden, ids, depth)
        rows = ids.shape[1] - 1
        starts = torch.arange(rows) + 1  # chain start position p for row p-1
        keep = (starts >= scored_from) & (starts + depth - 1 < rows)  # chains whose every depth is scored
        alive = torch.ones(ids.shape[0], int(keep.sum()), dtype=torch.bool)
        for j, out in enumerate(outputs):
            drafted = logits_of(model, out).argmax(-1)[:, keep[: out.shape[1]]]
            target = greedy[:, 1 + j: 1 + j + out.shape[1]][:, keep[: out.shape[1]]]
            alive &= drafted == target
            matched_prefix[j] += alive.sum()
        chains += alive.numel()
    rates = (matched_prefix / chains).tolist()
    return {"chains": chains, "accept_rate_by_depth": [round(r, 4) for r in rates],
            "accepted_per_round": {k: round(sum(rates[:k]), 4) for k in range(1, depth + 1)}}


@torch.no_grad()
def depth1_agreement(model, head, sequences) -> float:
    hits = total = 0
    for hidden, greedy, ids in sequences:
        out = run_chains(head, hidden, ids, 1)[0]
        hits += int((logits_of(model, out).argmax(-1) == greedy[:, 1:]).sum())
        total += greedy[:, 1:].numel()
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="training text: the fit and the tune scores both come from it")
    parser.add_argument("--fit-windows", type=int, default=2048)
    parser.add_argument("--window-len", type=int, default=128)
    parser.add_argument("--fit-skip", type=int, default=2000, help="documents of --data the fit skips")
    parser.add_argument("--tune-skip", type=int, default=400, help="documents of --data the tune windows skip")
    parser.add_argument("--tune-windows", type=int, default=16)
    parser.add_argument("--tune-prompts", type=int, default=16, help="prompts the teacher continues for the chain scores")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4, help="longest draft chain scored")
    parser.add_argument("--train-depth", type=int, default=1, help="chain depth the loss covers")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--feature-weight", type=float, default=1.0, help="weight of the smooth-L1 pull to h")
    parser.add_argument("--noise", type=float, default=0.0, help="uniform noise (in RMS units of h) on teacher features, as EAGLE")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).parent))
    from skip_speculative_graph import windows

    from sparsify.sources import load_model, load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype=torch.float32).eval(), load_tokenizer(args.model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    started = time.time()
    fit_ids = torch.cat(windows(args.data, tokenizer, args.fit_windows, args.window_len, skip_docs=args.fit_skip))
    fit = [(*teacher_pass(model, chunk), chunk) for chunk in fit_ids.split(args.batch)]
    tune_text = [(*teacher_pass(model, ids), ids)
                 for ids in windows(args.data, tokenizer, args.tune_windows, args.window_len, skip_docs=args.tune_skip)]
    prompts = torch.cat(windows(args.data, tokenizer, args.tune_prompts, args.prompt_len,
                                skip_docs=args.tune_skip + args.tune_windows))
    with torch.no_grad():
        continued = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False)
    tune_policy = [(*teacher_pass(model, ids), ids) for ids in continued.split(4)]
    scale = torch.cat([h.flatten(0, 1) for h, _, _ in fit[:32]]).pow(2).mean().sqrt().item()
    print(json.dumps({"teacher_pass_s": round(time.time() - started, 1), "fit_tokens": fit_ids.numel(),
                      "feature_rms": round(scale, 3),
                      "policy_agrees_with_pass": float((tune_policy[0][1][:, args.prompt_len - 1:-1]
                                                        == tune_policy[0][2][:, args.prompt_len:]).float().mean())}),
          flush=True)

    head = FeatureHead(model, model.config.num_hidden_layers - 1)
    trained = list(head.fuse.parameters()) + list(head.layer.parameters())
    for parameter in trained:
        parameter.requires_grad_(True)

    def scores() -> dict:
        head.eval()
        result = {"agreement_depth1_text": round(depth1_agreement(model, head, tune_text), 4),
                  "on_policy": chain_acceptance(model, head, tune_policy, args.depth, args.prompt_len)}
        head.train()
        return result

    row = {"init": scores()}
    print(json.dumps(row), flush=True)
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    started, losses = time.time(), []
    for step in range(args.steps):
        hidden, greedy, ids = fit[step % len(fit)]
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + torch.cos(torch.tensor(step / args.steps * torch.pi)).item())
        for group in optimizer.param_groups:
            group["lr"] = lr
        noisy = hidden + (torch.rand_like(hidden) - 0.5) * 2 * args.noise * scale if args.noise else hidden
        loss = 0.0
        for j, out in enumerate(run_chains(head, noisy, ids, args.train_depth)):
            target_h, target_y = hidden[:, 1 + j: 1 + j + out.shape[1]], greedy[:, 1 + j: 1 + j + out.shape[1]]
            loss = loss + F.cross_entropy(logits_of(model, out).flatten(0, 1), target_y.flatten())
            loss = loss + args.feature_weight * F.smooth_l1_loss(out / scale, target_h / scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(json.dumps({"step": step + 1, "loss": round(sum(losses[-50:]) / 50, 4),
                              "s": round(time.time() - started, 1)}), flush=True)
    row.update({"trained": scores(), "train_steps": args.steps,
                "train_tokens_seen": args.steps * args.batch * args.window_len, "train_s": round(time.time() - started, 1)})
    print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"benchmark": "draft_feature_head", "args": {k: str(v) for k, v in vars(args).items()},
                                    "row": row}, indent=1) + "\n")


if __name__ == "__main__":
    main()
