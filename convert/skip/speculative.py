"""Self-speculative decoding with a skip model, in plain transformers (any device, any batch size).

One set of weights holds both paths: the gates at a draft threshold skip sublayers and draft
`draft_tokens` tokens one at a time; the gates forced open are the dense teacher exactly, and verify
all the drafts in one forward pass. The output is the teacher's: greedy decoding emits the teacher's
greedy tokens, and sampling keeps the teacher's distribution (standard speculative acceptance: accept
draft d with probability min(1, p(d) / q(d)), else sample from norm(max(0, p - q))).

Every sequence accepts its own number of drafts. The KV cache stays one rectangular DynamicCache: each
round appends the verified slots for every row, and a row's rejected slots stay in the cache masked out
of attention for good (a 2-D attention mask with holes, positions given per row). Slots every row
rejected are cropped. A draft step writes its K/V into the cache like any decode step (a skipped
attention sublayer still writes K/V), and verification replaces those slots with the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsify.convert.skip.decisions import find_gates, gates_open
from sparsify.convert.skip.draft_plan import DraftPlan, drafting
from sparsify.convert.skip.modeling_skip import cache_argument, returned_cache
from sparsify.errors import SparsifyError


@dataclass
class SpeculativeStats:
    draft_tokens: int
    rounds: int = 0  # verification passes
    row_rounds: int = 0  # (row, round) pairs of rows still generating
    drafted: int = 0
    accepted: int = 0
    accepted_histogram: list[int] = field(default_factory=list)  # [n] = row-rounds that accepted n drafts
    uneven_rounds: int = 0  # rounds in which the rows still generating accepted different numbers of drafts
    # Where rounds keep the fewest drafts any row accepted (the graph engine's one position): the share
    # each row accepted on its own. None where each row keeps its own.
    row_acceptance_rate: float | None = None

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the teacher accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens a row gains per verification: its accepted drafts plus the teacher's own token."""
        return (self.accepted + self.row_rounds) / self.row_rounds if self.row_rounds else 0.0

    def add_round(self, accepted: list[int]) -> None:
        """One verification: the drafts each row still generating accepted."""
        self.rounds += 1
        self.uneven_rounds += int(len(set(accepted)) > 1)
        self.row_rounds += len(accepted)
        self.drafted += self.draft_tokens * len(accepted)
        self.accepted += sum(accepted)
        for count in accepted:
            self.accepted_histogram[count] += 1

    def record(self) -> dict:
        return {"draft_tokens": self.draft_tokens, "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_round": self.tokens_per_round,
                "accepted_histogram": self.accepted_histogram, "uneven_rounds": self.uneven_rounds,
                "row_acceptance_rate": self.row_acceptance_rate}


@dataclass
class SpeculativeResult:
    sequences: torch.Tensor  # (batch, prompt + new): the prompt as given, then max_new_tokens per row (pad after EOS)
    stats: SpeculativeStats


@dataclass(frozen=True)
class Sampling:
    """How a token is picked from logits; the draft and the teacher are processed alike, as acceptance needs."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(-1)
        return sample(self.probabilities(logits), generator)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of (..., V) probabilities (inverse CDF on a uniform draw: works on any device)."""
    flat = probs.reshape(-1, probs.shape[-1])
    uniform = torch.rand(flat.shape[0], 1, device=flat.device, generator=generator)
    cdf = flat.cumsum(-1)
    index = torch.searchsorted(cdf, uniform * cdf[:, -1:]).clamp_max(flat.shape[-1] - 1)
    return index.view(probs.shape[:-1])


def accept_greedy(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted drafts n per row, the n + 1 tokens each row emits, padded to k + 1): the drafts the
    teacher's argmax agrees with, then the teacher's own token."""
    target = target_logits.argmax(-1)  # (B, k + 1)
    n = (target[:, :-1] == drafts).long().cumprod(-1).sum(-1)
    return n, target  # target[:, :n + 1] equals the accepted drafts then the correction (or bonus) token


def accept_sampled(drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): each emitted token is distributed
    exactly as the teacher's `target_probs` given its prefix, whatever the drafts were."""
    batch, k = drafts.shape
    p = target_probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    uniform = torch.rand(batch, k, device=drafts.device, generator=generator)
    accepted = uniform * q <= p  # accept with probability min(1, p / q); q > 0 for a sampled draft
    n = accepted.long().cumprod(-1).sum(-1)
    rows = torch.arange(batch, device=drafts.device)
    rejected = n < k
    residual = target_probs[rows, n] - torch.where(rejected[:, None], draft_probs[rows, n.clamp_max(k - 1)], 0.0)
    residual = residual.clamp_min(0.0)
    # p == q at the rejected position leaves no residual mass (a rejection there has probability 0): use p.
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, target_probs[rows, n], residual)
    tokens = torch.cat([drafts, drafts[:, :1]], dim=1)
    tokens[rows, n] = sample(residual, generator)
    return n, tokens


def _ones(mask: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], columns)], dim=1)


def _draft(model, cache, mask: torch.Tensor, lengths: torch.Tensor, last: torch.Tensor, count: int, sampling: Sampling,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`count` tokens drafted one at a time after `last` with the gates as they are set: (B, count), and
    their processed probabilities (B, count, V) when sampling. Their K/V stay in `cache` for the caller to crop."""
    key = cache_argument(model.forward)
    drafts, probs, token = [], [], last
    for step in range(count):
        mask = _ones(mask, 1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=(lengths + step)[:, None], use_cache=True,
                       **{key: cache}).logits[:, -1]
        if sampling.do_sample:
            probs.append(sampling.probabilities(logits))
            token = sample(probs[-1], generator)
        else:
            token = logits.argmax(-1)
        drafts.append(token)
    return torch.stack(drafts, dim=1), (torch.stack(probs, dim=1) if probs else None)


@torch.no_grad()
def speculative_generate(model, input_ids: torch.Tensor, *, max_new_tokens: int, draft_tokens: int = 4,
                         draft_threshold: float | None = None, plan: DraftPlan | None = None, attention_mask: torch.Tensor | None = None,
                         sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
                         eos_token_id: int | list[int] | None = None, pad_token_id: int = 0) -> SpeculativeResult:
    """Generate `max_new_tokens` per row from the teacher inside `model` (a skip model), drafting with its
    gates at `draft_threshold` (default: the model's own threshold), or as `plan` says (convert/skip/draft_plan.py).
    Left-padded prompts take an
    `attention_mask`; rows stop at `eos_token_id` (one id or several) and are padded with `pad_token_id` after it."""
    gates = find_gates(model)
    if not gates:
        raise SparsifyError("self-speculative decoding drafts with a skip model's gates; this model has none "
                            "(make one with `sparsify upcycle MODEL --to skip` and train it)")
    if draft_tokens < 1 or max_new_tokens < 1:
        raise SparsifyError(f"--draft-tokens and --max-new-tokens must be at least 1, got {draft_tokens} and {max_new_tokens}")
    window = getattr(model.config, "sliding_window", None)
    if window and getattr(model.config, "use_sliding_window", True):
        # A sliding-window cache cannot be cropped once full, and it would count the masked slots of
        # rejected drafts as tokens: the verifier would no longer see what the teacher sees.
        raise SparsifyError(f"this model attends through a sliding window ({window} tokens), which self-speculative decoding "
                            "does not support yet")
    device, batch, k = input_ids.device, input_ids.shape[0], draft_tokens
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(device).long()
    if not bool(mask[:, -1].all()):
        raise SparsifyError("pad prompts on the left (tokenizer.padding_side = 'left'): every row continues from its last column")
    stops = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    stats = SpeculativeStats(k, accepted_histogram=[0] * (k + 1))
    key = cache_argument(model.forward)
    with gates_open(gates):  # the prompt's K/V are the teacher's
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True,
                    logits_to_keep=1)
    cache = returned_cache(out)
    lengths = mask.sum(-1)  # the next position of each row
    last = sampling.pick(out.logits[:, -1], generator)  # the teacher's first token, not yet in the cache
    emitted = [[int(t)] for t in last]
    done = [int(t) in stops for t in last]
    while rows := [row for row in range(batch) if not done[row] and len(emitted[row]) < max_new_tokens]:
        with drafting(model, plan or DraftPlan.per_token(draft_threshold)):
            drafts, draft_probs = _draft(model, cache, mask, lengths, last, k, sampling, generator)
        cache.crop(-k)  # the drafts' K/V: verification writes the teacher's
        # Verify: the last token and every draft in one forward pass with the gates open (the teacher).
        mask = _ones(mask, k + 1)
        with gates_open(gates):
            out = model(input_ids=torch.cat([last[:, None], drafts], dim=1), attention_mask=mask,
                        position_ids=lengths[:, None] + torch.arange(k + 1, device=device), use_cache=True, **{key: cache})
        cache = returned_cache(out)
        if sampling.do_sample:
            n, tokens = accept_sampled(drafts, draft_probs, sampling.probabilities(out.logits), generator)
        else:
            n, tokens = accept_greedy(drafts, out.logits)
        # Row b keeps the slots of `last` and its n accepted drafts; the rest are masked for good, and
        # the slots no row still generating kept are dropped.
        mask[:, -(k + 1):] = (torch.arange(k + 1, device=device)[None] <= n[:, None]).long()
        unused = k - int(n[rows].max())
        if unused:
            cache.crop(-unused)
            mask = mask[:, : mask.shape[1] - unused]
        lengths = lengths + n + 1
        last = tokens.gather(1, n[:, None]).squeeze(1)
        stats.add_round(n[rows].tolist())
        for row in rows:
            for token in tokens[row, : int(n[row]) + 1].tolist():
                if len(emitted[row]) >= max_new_tokens or done[row]:
                    break
                emitted[row].append(token)
                done[row] = token in stops
    new = torch.full((batch, max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=device)
    for row, tokens in enumerate(emitted):
        new[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return SpeculativeResult(torch.cat([input_ids, new], dim=1), stats)
