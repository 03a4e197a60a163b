"""Finding a static draft plan: which sublayers the draft path can drop and still agree with the teacher.

Greedy backward elimination on tune text (training text, never the held-out text a report uses): the
teacher's next-token choices are computed once with every gate open, then sublayers are dropped one
at a time, each time the one whose removal keeps the draft's greedy choices closest to the
teacher's (top-1 agreement with the teacher under teacher forcing, the proxy for greedy acceptance;
mean KL to the teacher breaks ties). The curve of agreement against the share dropped is returned
with a plan per requested share, so one search serves several draft budgets.

On-policy search (`teacher_continuations`, `scored_from`): the tune windows become prompts, the
teacher continues each greedily, and only the teacher's own tokens are scored. A draft is judged on
exactly that text when it decodes, and the teacher's greedy text is more predictable than the
corpus that follows a prompt, so it ranks sublayers by what decoding needs from them.

Agreement here is a per-token proxy, not the acceptance rate: a round keeps drafts only up to the first
miss, so the share of drafts accepted falls with the draft length (k = 2 keeps less than one-token
agreement would say). In the other direction, in decoding the draft reads the teacher's K/V for the
whole verified prefix, whereas the teacher-forced draft forward reads its own K/V everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparsify.errors import SparsifyError
from sparsify.convert.skip.draft_plan import DraftPlan, drafting, sublayer_key, teacher_mode


@dataclass
class SearchStep:
    skip: tuple[str, ...]  # the sublayers dropped so far, in the order they were dropped
    agreement: float  # share of tune tokens whose draft argmax equals the teacher's
    kl: float  # mean KL(teacher || draft) per token, nats


@dataclass
class DraftSearch:
    steps: list[SearchStep]  # steps[i]: i sublayers dropped
    gated_sublayers: int
    tune_tokens: int  # the positions scored (on-policy: each continuation's tokens, and the teacher's choice after them)
    scored_on: str = "tune text"

    def plan_for(self, share: float) -> DraftPlan:
        """The plan dropping `share` of the gated sublayers (rounded to the nearest count)."""
        count = round(share * self.gated_sublayers)
        if count < 1:
            raise SparsifyError(f"a share of {share} drops no sublayer of {self.gated_sublayers} (the draft would be the teacher); "
                                f"ask for at least {1 / self.gated_sublayers:.3f}")
        if count >= len(self.steps):
            raise SparsifyError(f"the search stopped at {len(self.steps) - 1} sublayers; ask for a share up to "
                                f"{(len(self.steps) - 1) / self.gated_sublayers:.2f}")
        step = self.steps[count]
        return DraftPlan(step.skip, chosen_by={"search": f"greedy top-1 agreement on {self.scored_on}", "tune_tokens": self.tune_tokens,
                                               "tune_agreement": round(step.agreement, 4), "tune_kl": round(step.kl, 4)})

    def curve(self) -> list[dict[str, Any]]:
        return [{"dropped": len(s.skip), "share": len(s.skip) / self.gated_sublayers, "agreement": s.agreement, "kl": s.kl}
                for s in self.steps]


@torch.no_grad()
def teacher_continuations(model, prompts: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    """Each (B, P) batch of prompts followed by the teacher's own greedy continuation of `new_tokens`
    tokens (every gate open, on the static-cache engine): the text a speculative draft is judged on
    when it decodes, as opposed to the corpus text that follows the prompt."""
    from sparsify.engine.graph_decode import GraphDecoder

    if new_tokens < 1:
        raise SparsifyError(f"the teacher's continuation needs at least 1 token, got {new_tokens}")
    decoders: dict[tuple[int, ...], GraphDecoder] = {}  # one per prompt shape: a GPU captures its step once
    continued = []
    with teacher_mode(model):
        for ids in prompts:
            shape = tuple(ids.shape)
            if shape not in decoders:
                decoders[shape] = GraphDecoder(model, ids.shape[0], ids.shape[1] + new_tokens + 1)
            continued.append(decoders[shape].generate(ids, new_tokens))
    return continued


@torch.no_grad()
def _scores(model, batches: list[torch.Tensor], teacher: list[tuple[torch.Tensor, torch.Tensor]], skip: tuple[str, ...],
            scored_from: int = 0) -> tuple[float, float]:
    agree, kl, count = 0.0, 0.0, 0
    with drafting(model, DraftPlan(skip)):
        for ids, (choice, log_p) in zip(batches, teacher, strict=True):
            log_q = F.log_softmax(model(input_ids=ids).logits[:, scored_from:].float(), dim=-1)
            agree += float((log_q.argmax(-1) == choice).sum())
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            count += choice.numel()
    return agree / count, kl / count


@torch.no_grad()
def search_draft_plan(model, batches: list[torch.Tensor], max_share: float, progress=None, scored_from: int = 0) -> DraftSearch:
    """Drop sublayers greedily until `max_share` of the gated ones are gone; `batches` are (B, L) token
    ids of tune text, scored from position `scored_from` on (the positions before are context: a
    prompt whose teacher continuation, from teacher_continuations, is what gets scored).
    `progress(done, total)` is called after each step."""
    if not 0.0 < max_share <= 1.0:
        raise SparsifyError(f"the draft plan's skipped share must be in (0, 1], got {max_share}")
    keys = [sublayer_key(layer, sublayer) for layer, sublayer, _ in model.skip_gates()]
    if not keys:
        raise SparsifyError("a draft plan drops a skip model's gated sublayers; this model has none")
    teacher = []
    with drafting(model, DraftPlan()):  # every gate open: the teacher
        for ids in batches:
            log_p = F.log_softmax(model(input_ids=ids).logits[:, scored_from:].float(), dim=-1)
            teacher.append((log_p.argmax(-1), log_p))
    steps = [SearchStep((), *_scores(model, batches, teacher, (), scored_from))]
    target = round(max_share * len(keys))
    while len(steps) - 1 < target:
        current = steps[-1].skip
        trials = [(key, _scores(model, batches, teacher, current + (key,), scored_from)) for key in keys if key not in current]
        key, (agreement, kl) = max(trials, key=lambda trial: (trial[1][0], -trial[1][1]))
        steps.append(SearchStep(current + (key,), agreement, kl))
        if progress is not None:
            progress(len(steps) - 1, target)
    scored_on = "the teacher's greedy continuations of tune-text prompts" if scored_from else "tune text"
    return DraftSearch(steps, len(keys), sum(ids[:, scored_from:].numel() for ids in batches), scored_on)
