"""Training a draft head (draft_head.py) on training text, and scoring it as decoding would use it.

Loss per draft (EAGLE's two terms): cross-entropy of the draft's logits to the teacher's greedy token,
which is what greedy acceptance asks, plus a smooth-L1 pull of the draft feature to the teacher's top
hidden state (in units of that state's RMS), which keeps the chain's next input near what the
teacher would give it. With `depth` > 1 the loss also covers the draft's own chains up to that depth
(draft_head.run_chains): a chain is trained the way it is used, each step reading the last one's
output. Only the head's weights move; the teacher (every gate open) is frozen.

Scores, on tune windows held apart from the fit windows (both from the training text; never the
held-out or other-domain text):
  - agreement: teacher-forced top-1 agreement of the first draft on the tune text;
  - accept_by_depth[j]: on the teacher's own greedy continuations of the tune windows (the text a
    draft meets when decoding), the share of chains whose first j + 1 drafts are all the teacher's
    tokens; its sum over the first k depths is the expected accepted drafts per round of k drafts.

Checkpoints (sparsify/train/state.py) make a killed run resume where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sparsify.convert.skip.draft_head import DraftHead, draft_logits, run_chains, top_hidden
from sparsify.convert.skip.draft_plan import teacher_mode
from sparsify.errors import SparsifyError

# Teacher targets are kept in memory across passes up to this many hidden-state elements (1 GiB in
# fp32); a larger fit set recomputes them, which costs one teacher forward per batch.
CACHED_ELEMENTS = 2 ** 28


@dataclass
class DraftHeadOptions:
    steps: int = 1000
    batch_size: int = 8
    window_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 20
    depth: int = 2  # chain depth the loss covers (1: teacher-forced first drafts only)
    feature_weight: float = 1.0  # weight of the smooth-L1 pull to the teacher's state
    score_windows: int = 16  # tune windows, held apart from the fit windows
    score_prompt_len: int = 0  # each tune window's first tokens prompt the teacher's continuation (0: half a window)
    score_new_tokens: int = 64
    score_depth: int = 4
    checkpoint_every: int = 200
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise SparsifyError("--steps, --batch-size and --checkpoint-every must be at least 1")
        if self.window_len < 8:
            raise SparsifyError(f"--window-len must be at least 8 tokens, got {self.window_len}")
        if not 1 <= self.depth <= 8 or not 1 <= self.score_depth <= 8:
            raise SparsifyError("--depth and the score depth must lie in 1..8 (draft lengths of a round)")
        if not 1 <= self.prompt_len < self.window_len:
            raise SparsifyError(f"the scoring prompt ({self.prompt_len} tokens) must be shorter than a window ({self.window_len})")

    @property
    def prompt_len(self) -> int:
        return self.score_prompt_len or self.window_len // 2


@dataclass
class DraftHeadScores:
    agreement: float  # teacher-forced first-draft agreement on tune text
    accept_by_depth: list[float]  # on the teacher's continuations: chains whose first j+1 drafts all match
    chains: int

    def accepted_per_round(self, k: int) -> float:
        return sum(self.accept_by_depth[:k])


@torch.no_grad()
def teacher_targets(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top hidden states (before the final norm) and greedy tokens for (B, T) ids."""
    with teacher_mode(model):
        hidden = top_hidden(model, ids)
    return hidden, draft_logits(model, hidden).argmax(-1)


def chain_loss(head: DraftHead, model, hidden: torch.Tensor, greedy: torch.Tensor, ids: torch.Tensor, depth: int,
               feature_weight: float, scale: float) -> torch.Tensor:
    loss = hidden.new_zeros(())
    for j, out in enumerate(run_chains(head, model, hidden, ids, depth)):
        rows = out.shape[1]
        target_hidden, target_token = hidden[:, j: j + rows], greedy[:, j: j + rows]
        loss = loss + F.cross_entropy(draft_logits(model, out).float().flatten(0, 1), target_token.flatten())
        loss = loss + feature_weight * F.smooth_l1_loss(out.float() / scale, target_hidden.float() / scale)
    return loss / depth


@torch.no_grad()
def score_draft_head(head: DraftHead, model, tune: list[torch.Tensor], continued: list[torch.Tensor], prompt_len: int,
                     depth: int) -> DraftHeadScores:
    """Agreement on `tune` windows, and chain acceptance on `continued` (prompt_len prompt tokens, then
    the teacher's greedy tokens): chains that start at a teacher token and end inside the window."""
    was_training = head.training
    head.eval()
    hits = total = 0
    for ids in tune:
        hidden, greedy = teacher_targets(model, ids)
        first = run_chains(head, model, hidden, ids, 1)[0]
        hits += int((draft_logits(model, first).argmax(-1) == greedy).sum())
        total += greedy.numel()
    matched, chains = torch.zeros(depth), 0
    for ids in continued:
        hidden, greedy = teacher_targets(model, ids)
        outputs = run_chains(head, model, hidden, ids, depth)
        starts = torch.arange(ids.shape[1], device=ids.device)
        # a chain from p reads x[p] (a teacher token from the prompt's end on) and is scored at p .. p+depth-1
        keep = (starts >= prompt_len) & (starts + depth <= ids.shape[1])
        alive = torch.ones(ids.shape[0], int(keep.sum()), dtype=torch.bool, device=ids.device)
        for j, out in enumerate(outputs):
            rows = out.shape[1]
            drafted = draft_logits(model, out).argmax(-1)[:, keep[:rows]]
            alive &= drafted == greedy[:, j: j + rows][:, keep[:rows]]
            matched[j] += float(alive.sum())
        chains += alive.numel()
    head.train(was_training)
    return DraftHeadScores(hits / max(total, 1), [float(m) / max(chains, 1) for m in matched], chains)


@dataclass
class DraftHeadFit:
    scores_before: DraftHeadScores
    scores: DraftHeadScores
    steps: int
    tokens_seen: int
    fit_windows: int
    seconds: float
    resumed_from: int | None
    losses: list[float]  # the mean loss of each tenth of the run

    def record(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens_seen": self.tokens_seen, "fit_windows": self.fit_windows, "seconds": round(self.seconds, 1),
                "resumed_from_step": self.resumed_from, "loss_by_tenth": [round(v, 4) for v in self.losses],
                "scores_before": asdict(self.scores_before), "scores": asdict(self.scores)}


def fit_draft_head(head: DraftHead, model, fit: torch.Tensor, tune: torch.Tensor, options: DraftHeadOptions,
                   run_dir: Path | None = None, on_step: Callable[[int, int, float], None] = lambda step, total, loss: None) -> DraftHeadFit:
    """Train `head` on `fit` windows (N, T) for options.steps batches, scoring before and after on
    `tune` windows. With `run_dir`, checkpoints go there every options.checkpoint_every steps and an
    interrupted run resumes from the last one."""
    from torch.optim.lr_scheduler import LambdaLR

    from sparsify.convert.skip.draft_search import teacher_continuations
    from sparsify.train.schedule import cosine_with_warmup
    from sparsify.train.state import find_checkpoint, gather_optimizer, gather_trainable, load_checkpoint, save_checkpoint

    options.check()
    device = next(head.parameters()).device
    torch.manual_seed(options.seed)
    tune_batches = [tune[i: i + options.batch_size].to(device) for i in range(0, len(tune), options.batch_size)]
    prompts = [batch[:, : options.prompt_len] for batch in tune_batches]
    continued = teacher_continuations(model, prompts, options.score_new_tokens)
    score = lambda: score_draft_head(head, model, tune_batches, continued, options.prompt_len, options.score_depth)  # noqa: E731
    batches = [fit[i: i + options.batch_size] for i in range(0, len(fit) - options.batch_size + 1, options.batch_size)]
    if not batches:
        raise SparsifyError(f"the fit text holds {len(fit)} windows, fewer than one batch of {options.batch_size}; give more training text")
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if fit.numel() * head.config.hidden_size <= CACHED_ELEMENTS else None

    def targets(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is not None and index in cache:
            return cache[index]
        found = teacher_targets(model, batches[index].to(device))
        if cache is not None:
            cache[index] = found
        return found

    # One scale for the feature loss: the RMS of the teacher's top state on the first batch.
    scale = float(targets(0)[0].float().pow(2).mean().sqrt())
    trainable = {name: p for name, p in head.named_parameters()}
    for parameter in trainable.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=options.lr, weight_decay=0.0)
    scheduler = LambdaLR(optimizer, cosine_with_warmup(0, min(options.warmup_steps, options.steps // 4), options.steps))
    meta = {"options": asdict(options), "fit_windows": len(fit)}
    start, resumed_from = 0, None
    before = None
    if run_dir is not None and (found := find_checkpoint(run_dir)) is not None:
        saved = load_checkpoint(found, head, optimizer, scheduler, set(trainable))
        if saved.get("options") != meta["options"] or saved.get("fit_windows") != meta["fit_windows"]:
            raise SparsifyError(f"{run_dir} holds a checkpoint of a run with other options or data; pass the same ones, or another run folder")
        start = resumed_from = int(saved["step"])
        before = DraftHeadScores(**saved["scores_before"])
        losses = list(saved.get("losses", []))
    if before is None:
        before, losses = score(), []
    head.train()
    started = time.time()
    for step in range(start, options.steps):
        hidden, greedy = targets(step % len(batches))
        loss = chain_loss(head, model, hidden, greedy, batches[step % len(batches)].to(device), options.depth, options.feature_weight, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise SparsifyError(f"the draft head's loss became {value} at step {step + 1}; lower --lr")
        losses.append(value)
        on_step(step + 1, options.steps, value)
        if run_dir is not None and (step + 1) % options.checkpoint_every == 0 and step + 1 < options.steps:
            save_checkpoint(run_dir, step + 1, gather_trainable(head, set(trainable)), gather_optimizer(head, optimizer), scheduler,
                            {**meta, "scores_before": asdict(before), "losses": losses})
    head.eval()
    for parameter in trainable.values():
        parameter.requires_grad_(False)
    tenth = max(1, len(losses) // 10)
    return DraftHeadFit(before, score(), options.steps, options.steps * options.batch_size * options.window_len, len(fit),
                        time.time() - started, resumed_from, [sum(losses[i: i + tenth]) / len(losses[i: i + tenth])
                                                              for i in range(0, len(losses), tenth)])
