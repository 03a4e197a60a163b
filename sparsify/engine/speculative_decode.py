"""Self-speculative greedy decoding on the static-cache engine, one CUDA graph per round.

A round: the skip model's draft path (convert/skip/draft_plan.py) drafts `draft_tokens` tokens one
step at a time, the teacher (every gate open: the dense model exactly) verifies the last token and
every draft in one forward pass of k + 1 tokens, and the accepted drafts plus the teacher's own next
token are kept, all on the GPU: the draft steps, the verification forward and the acceptance are
captured as one graph and replayed once per round; the host reads one small tensor per round (where
the sequences stand, whether they all ended).

On a GPU in a half dtype the verification runs the decode step's own fused kernels over the k + 1
tokens at once (sparsify/engine/attention_kernels.py): at batch 1 it costs about one teacher step
(1.09 on the H100 at SmolLM2's shape, k = 2; unfused it cost 2.5). It rounds nearly as the teacher's
step does (its GEMMs see k + 1 rows, and cuBLAS may pick other kernels for them), and both take the
argmax of fp32 logits (GraphDecoder.head), so only a near-tie of the teacher's may still flip.

The cache is the engine's static one, masked by position, so rejecting drafts is moving the position
back: verification has already written the teacher's K/V for every slot it saw, the accepted ones are
kept as they are, and the rejected ones are masked and rewritten by the next round. A draft step
writes K/V only for the sublayers it runs (a sublayer the plan skips statically is read by no draft
token, and verification rewrites it); a sublayer the draft gates per token keeps the KV rule.

All sequences share one position (the engine's), so at batch > 1 each round keeps the fewest drafts
any sequence accepted: still exactly the teacher's greedy tokens for every sequence, fewer tokens per
round than each would accept alone (reported beside it). The plain-transformers path
(convert/skip/speculative.py) keeps per-sequence acceptance, and sampling.

With a draft head (convert/skip/draft_head.py, sparsify/engine/head_draft.py) the drafts come from
the head instead: one small layer on the teacher's own top hidden states, which the verification
computes anyway. The verification, acceptance and rollback are the same.

Without CUDA (or with `use_graph=False`) the same round runs eagerly: that is how it is tested
against the teacher's own greedy decode on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.convert.skip.draft_head import DraftHead
from sparsify.convert.skip.draft_plan import DraftPlan, drafting, teacher_mode
from sparsify.convert.skip.speculative import SpeculativeResult, SpeculativeStats
from sparsify.engine import attention_kernels
from sparsify.engine.graph_decode import GraphDecoder
from sparsify.engine.head_draft import HeadDrafter
from sparsify.engine.token_run import TokenRows, run_layer
from sparsify.errors import SparsifyError

TEACHER = DraftPlan()  # nothing skipped, nothing gated: every sublayer runs


class SpeculativeDecoder:
    """Greedy self-speculative decoding of `batch` sequences of up to `max_len` tokens (prompt and
    new tokens; the round needs `draft_tokens + 2` slots of headroom, added here)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, plan: DraftPlan, draft_tokens: int,
                 use_graph: bool | None = None, head: DraftHead | None = None):
        """`head`: draft with this draft head instead of the skip model's own path (`plan` is then
        unused, and the model may be dense)."""
        if draft_tokens < 1:
            raise SparsifyError(f"--draft-tokens must be at least 1, got {draft_tokens}")
        self.model, self.plan, self.k = model, TEACHER if head is not None else plan, draft_tokens
        with teacher_mode(model) if head is not None else drafting(model, plan):  # the engine reads the gates' state when built
            self.draft = GraphDecoder(model, batch, max_len + draft_tokens + 2, use_graph=use_graph, skipped_kv=False)
        engine = self.draft
        self.device, self.batch, self.use_graph = engine.device, batch, engine.use_graph
        # The verify pass runs the teacher's sublayers as the engine's own step runs them (fused,
        # Triton, a half dtype): the same kernel count per layer as one decode step, and nearly the
        # same rounding as the teacher's step (the GEMMs see k + 1 rows).
        fusable = [engine.fusable(layer) for layer in engine.layers]
        self.fused_attention = [attention for attention, _ in fusable]
        self.fused_mlp = [mlp for _, mlp in fusable]
        self.verify_scratch = (attention_kernels.scratch_where_it_fits(engine.keys[0], engine.heads, tokens=draft_tokens + 1)
                               if any(self.fused_attention) else None)
        self.offsets = torch.arange(draft_tokens + 1, device=self.device)
        self.head = HeadDrafter(head, engine, draft_tokens, self.verify_scratch, self.offsets) if head is not None else None
        self.start = torch.zeros(1, dtype=torch.long, device=self.device)  # the slot of the round's first token
        # Per round, how many drafts were kept (the fewest any sequence accepted), and per sequence what it accepted.
        self.kept_histogram = torch.zeros(draft_tokens + 1, dtype=torch.long, device=self.device)
        self.row_accepted = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    # -- one round ---------------------------------------------------------------------------------
    def _verify(self, tokens: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's top hidden states (B, T, H), before the final norm, for `tokens` (B, T) at
        cache `slots` (T,), writing their K/V; with a draft head, also the outputs of the layers it
        reads, side by side (B, T, n * H)."""
        engine = self.draft
        hidden = self.model.model.embed_tokens(tokens)
        rows = TokenRows.at(engine, slots, generic=not all(self.fused_attention) or self.verify_scratch is None)
        read = self.head.head.read_layers if self.head is not None else []
        kept = []
        for layer, fused_attention, fused_mlp in zip(engine.layers, self.fused_attention, self.fused_mlp, strict=True):
            run_layer(engine, layer.block, fused_attention, fused_mlp, hidden, rows, engine.keys[layer.index],
                      engine.values[layer.index], self.verify_scratch)
            if layer.index in read and layer.index != engine.layers[-1].index:
                kept.append(hidden.clone())  # the next layer adds to hidden in place
        if not read:
            return hidden, None
        states = kept + ([hidden] if engine.layers[-1].index in read else [])  # read is sorted: the top one last
        return hidden, states[0] if len(states) == 1 else torch.cat(states, dim=-1)

    def _round(self) -> None:
        engine, k = self.draft, self.k
        self.start.copy_(engine.position)
        if self.head is not None:  # history[start + 1 .. start + k] = the drafts
            self.head.draft(self.start)
        else:
            for _ in range(k):
                engine._step()
        slots = self.start + self.offsets
        tokens = engine.history.index_select(1, slots)  # the round's first token, then the drafts
        hidden, read_states = self._verify(tokens, slots)
        target = engine.head(engine._norm(self.model.model.norm, hidden)).argmax(-1)  # (B, k + 1): the teacher's choice after each
        accepted = (target[:, :k] == tokens[:, 1:]).long().cumprod(-1).sum(-1)
        kept = accepted.min()  # one position for every sequence: the fewest accepted
        if self.head is not None:
            self.head.verified_states(read_states, kept)
        # target[:, :kept + 1] are the kept drafts, then the teacher's token; later slots are rewritten.
        engine.history.index_copy_(1, slots + 1, target)
        engine.position.copy_(self.start + kept + 1)
        engine.token.copy_(target.gather(1, kept.view(1, 1).expand(self.batch, 1)))
        self.kept_histogram.index_add_(0, kept.view(1), torch.ones(1, dtype=torch.long, device=self.device))
        self.row_accepted.add_(accepted)

    def _drafting(self):
        return teacher_mode(self.model) if self.head is not None else drafting(self.model, self.plan)

    def _run_round(self) -> None:
        if not self.use_graph:
            with self._drafting():
                self._round()
            return
        if self.graph is None:
            state = (self.start, self.kept_histogram, self.row_accepted)
            if self.head is not None:
                state += (self.head.verified, self.head.kept)
            with self._drafting():  # the gate kernels take the draft threshold when captured
                self.graph = self.draft._capture(self._round, state=state)
        self.graph.replay()

    def prefill(self, ids: torch.Tensor) -> None:
        """The prompt's K/V and first token, the teacher's; with a draft head, the head's items too."""
        engine = self.draft
        with teacher_mode(self.model):
            if self.head is None:
                engine.prefill(ids)
                return
            read = self.head.head.read_layers  # their outputs: for the top layer, the final norm's input
            states: dict[int, torch.Tensor] = {}
            hooks = [self.model.model.layers[i].register_forward_hook(
                lambda module, args, out, i=i: states.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in read]
            try:
                engine.prefill(ids)
            finally:
                for hook in hooks:
                    hook.remove()
            self.head.prefill(torch.cat([states[i] for i in read], dim=-1), ids)

    # -- public ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int = 0) -> SpeculativeResult:
        """The teacher's greedy continuation of `ids` (no padding), `new_tokens` per row; rows stop at
        an end token and are padded after it. Stops early once every row has ended."""
        engine = self.draft
        length = ids.shape[1]
        if length + new_tokens + self.k + 2 > engine.max_len:
            raise SparsifyError(f"prompt ({length}) + new tokens ({new_tokens}) exceed the decoder's {engine.max_len - self.k - 2} tokens")
        self.prefill(ids)
        self.kept_histogram.zero_()
        self.row_accepted.zero_()
        stops = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                             dtype=torch.long, device=self.device)
        end = length + new_tokens  # history[length:end] are the new tokens
        while True:
            emitted = engine.history[:, length:end]
            reached = engine.position + 1 - length  # tokens emitted so far, every row alike
            ended = torch.isin(emitted, stops) & (torch.arange(new_tokens, device=self.device) < reached)
            state = torch.cat([reached, ended.any(-1).all().long().view(1)]).tolist()  # the round's one synchronisation
            if state[0] >= new_tokens or state[1]:
                break
            self._run_round()
        new = engine.history[:, length:end].clone()
        if stops.numel():  # after a row's end token: padding
            seen = torch.isin(new, stops).long().cumsum(-1)
            new[(seen - torch.isin(new, stops).long()) > 0] = pad_token_id
        return SpeculativeResult(torch.cat([ids, new], dim=1), self.stats())

    def stats(self) -> SpeculativeStats:
        """Acceptance so far: what the rounds kept; `row_acceptance_rate` what sequences accepted alone."""
        histogram = self.kept_histogram.tolist()
        stats = SpeculativeStats(self.k, accepted_histogram=[0] * (self.k + 1))
        for kept, rounds in enumerate(histogram):
            for _ in range(rounds):
                stats.add_round([kept] * self.batch)
        stats.row_acceptance_rate = float(self.row_accepted.sum()) / stats.drafted if stats.drafted else None
        return stats


@dataclass
class SpeculativeTiming:
    seconds_per_token: list[float]  # per repeat: wall time of the rounds / new tokens per row (prefill excluded)
    stats: SpeculativeStats  # of the last repeat
    use_graph: bool


def time_speculative_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int, plan: DraftPlan, draft_tokens: int, *,
                            warmup: int, repeats: int, use_graph: bool | None = None,
                            decoder: SpeculativeDecoder | None = None, head: DraftHead | None = None) -> SpeculativeTiming:
    """Seconds per new token of greedy self-speculative decoding, one figure per repeat: each repeat
    prefills `ids` (untimed: the same prefill as the teacher's), then times rounds until `new_tokens`
    are out, divided by the tokens those rounds made.
    `decoder`: one built before for the same batch, plan and draft length and room for the tokens
    (its captured round is reused, so several prompts of one length cost one capture)."""
    if decoder is None:
        decoder = SpeculativeDecoder(model, ids.shape[0], ids.shape[1] + new_tokens, plan, draft_tokens, use_graph=use_graph, head=head)
    elif ((decoder.plan, decoder.k, decoder.batch) != (TEACHER if head is not None else plan, draft_tokens, ids.shape[0])
          or (decoder.head.head if decoder.head is not None else None) is not head):
        raise SparsifyError("the decoder given was built for another plan, draft head, draft length or batch")
    if new_tokens < 2:
        raise SparsifyError(f"time at least 2 new tokens (the prefill makes the first), not {new_tokens}")
    if ids.shape[1] + new_tokens + decoder.k + 2 > decoder.draft.max_len:
        raise SparsifyError(f"prompt ({ids.shape[1]}) + new tokens ({new_tokens}) exceed the decoder's "
                            f"{decoder.draft.max_len - decoder.k - 2} tokens")
    cuda = decoder.device.type == "cuda"
    engine = decoder.draft

    def once() -> float:
        with torch.no_grad():
            decoder.prefill(ids)
        decoder.kept_histogram.zero_()
        decoder.row_accepted.zero_()
        if cuda:
            torch.cuda.synchronize(decoder.device)
        started = time.perf_counter()
        with torch.no_grad():
            while int(engine.position) + 1 - ids.shape[1] < new_tokens:
                decoder._run_round()
        if cuda:
            torch.cuda.synchronize(decoder.device)
        # The rounds made position - length tokens (the prefill made one more): a last round may overshoot by up to k.
        return (time.perf_counter() - started) / (int(engine.position) - ids.shape[1])

    for _ in range(max(warmup, 1)):
        once()
    seconds = [once() for _ in range(repeats)]
    return SpeculativeTiming(seconds, decoder.stats(), decoder.use_graph)
