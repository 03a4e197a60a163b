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

import json
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
    feature_layers: tuple[int, ...] = ()  # the teacher layers the head reads (empty: the top one; DraftHead)

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.score_windows < 1:
            raise SparsifyError("--steps, --batch-size, --checkpoint-every and --score-windows must be at least 1")
        if not self.lr > 0:
            raise SparsifyError(f"--lr must be above 0, got {self.lr}")
        if self.feature_weight < 0:
            raise SparsifyError(f"--feature-weight must be 0 or more, got {self.feature_weight}")
        if self.window_len < 8:
            raise SparsifyError(f"--window-len must be at least 8 tokens, got {self.window_len}")
        if not 1 <= self.depth <= 8 or not 1 <= self.score_depth <= 8:
            raise SparsifyError("--depth must lie in 1..8 (a round's draft length), and so must the scored depth")
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


@dataclass
class TeacherTargets:
    hidden: torch.Tensor  # (B, T, H) the top state before the final norm: the feature loss's target
    greedy: torch.Tensor  # (B, T) the teacher's greedy tokens
    states: torch.Tensor  # (B, T, n * H) the states the head reads (the top one alone: `hidden` itself)


@torch.no_grad()
def teacher_targets(model, ids: torch.Tensor, read_layers: list[int] | None = None) -> TeacherTargets:
    """What the teacher gives the head for (B, T) ids."""
    with teacher_mode(model):
        hidden, states = top_hidden(model, ids, read_layers)
    return TeacherTargets(hidden, draft_logits(model, hidden).argmax(-1), states)


def chain_loss(head: DraftHead, model, targets: TeacherTargets, ids: torch.Tensor, depth: int, feature_weight: float,
               scale: float) -> torch.Tensor:
    hidden, greedy = targets.hidden, targets.greedy
    loss = hidden.new_zeros((), dtype=torch.float32)
    for j, out in enumerate(run_chains(head, model, targets.states, ids, depth)):
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
        targets = teacher_targets(model, ids, head.read_layers)
        greedy = targets.greedy
        first = run_chains(head, model, targets.states, ids, 1)[0]
        hits += int((draft_logits(model, first).argmax(-1) == greedy).sum())
        total += greedy.numel()
    matched, chains = torch.zeros(depth), 0
    for ids in continued:
        targets = teacher_targets(model, ids, head.read_layers)
        greedy = targets.greedy
        outputs = run_chains(head, model, targets.states, ids, depth)
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
                   run_dir: Path | None = None, on_step: Callable[[int, int, float], None] = lambda step, total, loss: None,
                   run_key: dict[str, Any] | None = None) -> DraftHeadFit:
    """Train `head` on `fit` windows (N, T) for options.steps batches, scoring before and after on
    `tune` windows. With `run_dir`, checkpoints go there every options.checkpoint_every steps and an
    interrupted run resumes from the last one, if it was the same run: same options, same number of
    windows and the same `run_key` (the caller's model and data).

    The head trains in fp32 whatever the teacher's dtype (bf16 Adam steps of ~1e-3 round away next
    to weights near 1) and ends in the teacher's dtype, as decoding uses it."""
    from torch.optim.lr_scheduler import LambdaLR

    from sparsify.convert.skip.draft_search import teacher_continuations
    from sparsify.train.schedule import cosine_with_warmup
    from sparsify.train.state import find_checkpoint, gather_optimizer, gather_trainable, load_checkpoint, save_checkpoint

    options.check()
    batches = [fit[i: i + options.batch_size] for i in range(0, len(fit) - options.batch_size + 1, options.batch_size)]
    if not batches:
        raise SparsifyError(f"the fit text holds {len(fit)} windows, fewer than one batch of {options.batch_size}; give more training text")
    meta = json.loads(json.dumps({"options": asdict(options), "fit_windows": len(fit), "run": run_key or {},  # as state.json holds it
                                  "head": {"hidden_size": head.config.hidden_size, "init_from_layer": head.config.init_from_layer,
                                           "read_layers": head.read_layers}}))
    found = find_checkpoint(run_dir) if run_dir is not None else None
    if found is not None:
        saved = json.loads((found / "state.json").read_text())
        changed = sorted(key for key in meta if saved.get(key) != meta[key])
        if changed:
            raise SparsifyError(f"{run_dir} holds a checkpoint of another run (its {', '.join(changed)} differ); give the same "
                                f"command to resume it, or delete {run_dir} to start over")
    device = next(head.parameters()).device
    final_dtype = next(head.parameters()).dtype
    head.float()
    torch.manual_seed(options.seed)
    tune_batches = [tune[i: i + options.batch_size].to(device) for i in range(0, len(tune), options.batch_size)]
    prompts = [batch[:, : options.prompt_len] for batch in tune_batches]
    continued = teacher_continuations(model, prompts, options.score_new_tokens)
    score = lambda: score_draft_head(head, model, tune_batches, continued, options.prompt_len, options.score_depth)  # noqa: E731
    kept_per_token = head.config.hidden_size * (1 + (len(head.read_layers) if head.reduce is not None else 0))
    cache: dict[int, TeacherTargets] | None = {} if fit.numel() * kept_per_token <= CACHED_ELEMENTS else None

    def targets(index: int) -> TeacherTargets:
        if cache is not None and index in cache:
            return cache[index]
        computed = teacher_targets(model, batches[index].to(device), head.read_layers)
        if cache is not None:
            cache[index] = computed
        return computed

    # One scale for the feature loss and the fuse's start: the RMS of the teacher's top state on the first batch.
    scale = float(targets(0).hidden.float().pow(2).mean().sqrt())
    head.balance_inputs(scale, float(model.model.embed_tokens.weight.float().pow(2).mean().sqrt()))
    trainable = {name: p for name, p in head.named_parameters()}
    for parameter in trainable.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=options.lr, weight_decay=0.0)
    scheduler = LambdaLR(optimizer, cosine_with_warmup(0, min(options.warmup_steps, options.steps // 4), options.steps))
    start, resumed_from = 0, None
    before = None
    if found is not None:
        try:
            saved = load_checkpoint(found, head, optimizer, scheduler, set(trainable))
        except (SparsifyError, RuntimeError, KeyError) as error:
            raise SparsifyError(f"cannot resume from {found} ({str(error).splitlines()[0]}); delete {run_dir} to start over") from None
        start = resumed_from = int(saved["step"])
        before = DraftHeadScores(**saved["scores_before"])
        losses = list(saved.get("losses", []))
    if before is None:
        before, losses = score(), []
    head.train()
    started = time.time()
    for step in range(start, options.steps):
        loss = chain_loss(head, model, targets(step % len(batches)), batches[step % len(batches)].to(device), options.depth,
                          options.feature_weight, scale)
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
    scores = score()
    head.to(final_dtype)
    tenth = max(1, len(losses) // 10)
    return DraftHeadFit(before, scores, options.steps, options.steps * options.batch_size * options.window_len, len(fit),
                        time.time() - started, resumed_from, [sum(losses[i: i + tenth]) / len(losses[i: i + tenth])
                                                              for i in range(0, len(losses), tenth)])
