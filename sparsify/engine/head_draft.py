"""Drafting with a draft head (convert/skip/draft_head.py) inside a speculative round of the engine.

The head has one layer and its own K/V cache, slot for slot beside the teacher's. Its item at slot p
reads (h[p-1], x[p]): the teacher's top hidden state before p and the token at p (a zero feature at
slot 0), as in training (draft_head.run_chains).

A round starts at slot P (the token the verifier chose last). The previous verification computed the
teacher's states h at its k + 1 slots (the outputs of every layer the head reads, reduced to one
feature by the head's `reduce` where it reads several); the `kept` drafts it accepted sit at P - kept .. P - 1, their
head items having been drafted from the head's own features. So the first pass rewrites k + 1 items
from slot P - kept on, with the verified states and the tokens now in the history: the items up to
P are right (the later ones are the verifier's guesses after a rejection, masked by position and
rewritten later), and the item at P gives the first draft. Each further draft is one item, reading
the last draft's feature. All of it has fixed shapes, so it is captured with the round.

After the prompt, the head's items for every prompt slot are written from the prefill's states,
and the first pass starts from kept = 0 with h[P-1] the prompt's last state.
"""

from __future__ import annotations

import torch

from sparsify.convert.skip.draft_head import DraftHead, shifted_features
from sparsify.engine import attention_kernels
from sparsify.engine.graph_decode import GraphDecoder, _Layer
from sparsify.engine.token_run import TokenRows, run_layer


class HeadDrafter:
    """`refill_scratch` (k + 1 tokens per sequence) and `offsets` (0..k) are the verification's own:
    a scratch serves every launch of one stream, the head's among them."""

    def __init__(self, head: DraftHead, engine: GraphDecoder, draft_tokens: int, refill_scratch: attention_kernels.AttentionScratch | None,
                 offsets: torch.Tensor):
        self.head, self.engine, self.k = head, engine, draft_tokens
        self.keys = torch.zeros_like(engine.keys[0])
        self.values = torch.zeros_like(engine.values[0])
        self.fused_attention, self.fused_mlp = engine.fusable(_Layer(-1, head.layer, None, None))
        self.step_scratch, self.refill_scratch, self.offsets = engine.attention_scratch, refill_scratch, offsets
        # the verified slots' states of the layers the head reads (n * H), as the verification wrote them
        width = head.config.hidden_size * len(head.read_layers)
        self.verified = torch.zeros(engine.batch, draft_tokens + 1, width, dtype=engine.dtype, device=engine.device)
        self.kept = torch.zeros(1, dtype=torch.long, device=engine.device)

    def _items(self, features: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, scratch) -> torch.Tensor:
        """The head's features for items (features, tokens) (B, T, H) / (B, T) at consecutive `slots`;
        `scratch` made for T tokens runs the decode attention kernel, None runs SDPA (the prompt)."""
        engine = self.engine
        hidden = self.head.fuse(torch.cat([features, engine.model.model.embed_tokens(tokens)], dim=-1))
        rows = TokenRows.at(engine, slots, generic=not self.fused_attention or scratch is None)
        run_layer(engine, self.head.layer, self.fused_attention, self.fused_mlp, hidden, rows, self.keys, self.values, scratch)
        return hidden

    def _choose(self, feature: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        return engine.head(engine._norm(engine.model.model.norm, feature)).argmax(-1)  # (B, 1)

    def prefill(self, states: torch.Tensor, ids: torch.Tensor) -> None:
        """The head's items for the prompt `ids` (B, L), from the teacher's states of the layers the
        head reads (B, L, n * H)."""
        slots = torch.arange(ids.shape[1], device=ids.device)
        self._items(shifted_features(self.head.teacher_feature(states)), ids, slots, None)  # L tokens: SDPA
        self.verified.zero_()
        self.verified[:, 0].copy_(states[:, -1])
        self.kept.zero_()

    def draft(self, start: torch.Tensor) -> None:
        """Write the round's k drafts into the history at start + 1 .. start + k."""
        engine, history = self.engine, self.engine.history
        slots = start - self.kept + self.offsets
        refilled = self._items(self.head.teacher_feature(self.verified), history.index_select(1, slots), slots, self.refill_scratch)
        feature = refilled.index_select(1, self.kept)
        for j in range(self.k):
            token = self._choose(feature)
            history.index_copy_(1, start + 1 + j, token)
            if j + 1 < self.k:
                feature = self._items(feature, token, start + 1 + j, self.step_scratch)

    def verified_states(self, states: torch.Tensor, kept: torch.Tensor) -> None:
        """Keep the verification's states of the layers the head reads (B, k + 1, n * H) and how many
        drafts it accepted."""
        self.verified.copy_(states)
        self.kept.copy_(kept.view(1))
