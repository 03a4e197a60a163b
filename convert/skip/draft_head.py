"""A feature-level draft head: the cheap draft of self-speculative decoding that a skip model's own
gates could not give (docs/results.md: on SmolLM2-135M no static plan reached 1x).

After a verification the teacher has computed its top hidden state h[p-1] (before the final norm),
which chose the token x[p]. The head drafts the next tokens from it (EAGLE, Li et al., 2024):

    f[p] = layer(fuse([h[p-1], embed(x[p])]))          draft token x[p+1] = argmax head(norm(f[p]))

and chains on its own output: the next step reads f[p] where h[p] would be. `layer` is one decoder
layer of the base family (its own weights, started as a copy of the teacher's last layer), `fuse` a
(2H -> H) linear started as [I | s I], s raising the embedding to the feature's scale; the
embedding, final norm and head are the teacher's, shared and frozen. At batch 1 a draft step is one
layer and the head: about a tenth of a teacher step. Position 0 reads a zero feature (no token
precedes it), in training and in decoding alike.

The verifier is untouched (every gate open: the dense teacher), so decoding stays lossless whatever
the head drafts; the head only decides how many drafts are accepted.

Saved in the model folder under draft_head/ (config.json: the layer's origin and what it was
trained on; model.safetensors: `fuse.weight` and `layer.*`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify.errors import SparsifyError

DRAFT_HEAD_FOLDER = "draft_head"


@dataclass
class DraftHeadConfig:
    init_from_layer: int  # the teacher layer the head's layer started as
    hidden_size: int
    training: dict[str, Any] = field(default_factory=dict)  # data, steps, tokens, scores (draft_head_training.py)
    # The teacher layers whose outputs the head reads, fused by `reduce` (EAGLE-3: low, middle and top
    # features); empty: the top layer's alone.
    feature_layers: list[int] = field(default_factory=list)


def check_feature_layers(chosen, layers: int) -> None:
    if any(not 0 <= i < layers for i in chosen):
        raise SparsifyError(f"--feature-layers must name layers 0..{layers - 1} of the teacher, got {list(chosen)}")


class DraftHead(nn.Module):
    """fuse([h, embed(x)]) -> one decoder layer of the teacher's family. The teacher's embedding,
    rotary table, norm and head are passed in, not held: the head's weights are only its own."""

    def __init__(self, model: nn.Module, init_from_layer: int | None = None, feature_layers: list[int] | None = None):
        super().__init__()
        layers = model.model.layers
        index = len(layers) - 1 if init_from_layer is None else init_from_layer
        if not 0 <= index < len(layers):
            raise SparsifyError(f"the draft head starts as one of the teacher's {len(layers)} layers, not layer {index}")
        chosen = sorted(set(feature_layers or []))
        check_feature_layers(chosen, len(layers))
        width = model.config.hidden_size
        self.config = DraftHeadConfig(index, width, feature_layers=chosen if chosen != [len(layers) - 1] else [])
        self.read_layers = chosen or [len(layers) - 1]
        # reduce: the chosen layers' states -> one feature, starting as the top one read (the rest at 0)
        self.reduce = nn.Linear(len(self.read_layers) * width, width, bias=False) if len(self.read_layers) > 1 else None
        if self.reduce is not None:
            with torch.no_grad():
                self.reduce.weight.zero_()
                self.reduce.weight[:, -width:].copy_(torch.eye(width))
        self.fuse = nn.Linear(2 * width, width, bias=False)
        # A fresh layer of the teacher's class (a skip model patches its layers' forward; the copy must not carry that).
        self.layer = type(layers[index])(model.config, index)  # the index only names a cache slot, which the head never uses
        self.layer.load_state_dict(layers[index].state_dict())
        reference = next(layers[index].parameters())
        self.to(device=reference.device, dtype=reference.dtype)
        self.balance_inputs(1.0, 1.0)

    @torch.no_grad()
    def balance_inputs(self, feature_rms: float, embedding_rms: float) -> None:
        """Start `fuse` as [I | (feature_rms / embedding_rms) I]: the feature plus the token's
        embedding raised to the feature's scale. Why: SmolLM2's top state has RMS ~44 and its
        embeddings ~0.14, so [I | I] leaves the token 1/300 of the input, and Adam, whose steps are
        about the learning rate whatever the gradient, would need ~1e5 steps to raise it (a first
        probe trained that way drafted from h[p-1] alone: 27% first-draft acceptance)."""
        width = self.fuse.weight.shape[0]
        eye = torch.eye(width, device=self.fuse.weight.device)
        self.fuse.weight.copy_(torch.cat([eye, eye * (feature_rms / embedding_rms)], dim=1))

    def teacher_feature(self, states: torch.Tensor) -> torch.Tensor:
        """The feature the head reads from the teacher's states (..., len(read_layers) * H)."""
        states = states.to(self.fuse.weight.dtype)
        return self.reduce(states) if self.reduce is not None else states

    def forward(self, features: torch.Tensor, embedded: torch.Tensor, position_embeddings, attention_mask) -> torch.Tensor:
        """Draft features (B, T, H), in the head's dtype, for teacher-or-draft features and embedded
        tokens (B, T, H) each (training keeps the head in fp32 under a bf16 teacher)."""
        dtype = self.fuse.weight.dtype
        hidden = self.fuse(torch.cat([features.to(dtype), embedded.to(dtype)], dim=-1))
        position_embeddings = tuple(t.to(dtype) for t in position_embeddings)
        return self.layer(hidden, position_embeddings=position_embeddings, attention_mask=attention_mask)

    # -- saving ------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path, model: nn.Module) -> "DraftHead":
        from safetensors.torch import load_file

        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise SparsifyError(f"{folder} holds no draft head (config.json and model.safetensors); make one with `sparsify draft-head`")
        try:
            config = DraftHeadConfig(**json.loads((folder / "config.json").read_text()))
        except (TypeError, ValueError) as error:
            raise SparsifyError(f"{folder}/config.json is not a draft head's config ({error}); make the head again with `sparsify draft-head`") from None
        if config.hidden_size != model.config.hidden_size:
            raise SparsifyError(f"the draft head in {folder} was made for hidden size {config.hidden_size}, "
                                f"this model has {model.config.hidden_size}")
        head = cls(model, config.init_from_layer, config.feature_layers)
        head.config = config
        try:
            head.load_state_dict({name: t.to(next(head.parameters()).dtype) for name, t in load_file(str(folder / "model.safetensors")).items()})
        except RuntimeError as error:
            raise SparsifyError(f"the draft head in {folder} does not fit this model's layers (made for another model family?): "
                                f"{str(error).splitlines()[0]}") from None
        return head.eval().requires_grad_(False)


def find_draft_head(model_dir: str | Path) -> Path | None:
    folder = Path(model_dir) / DRAFT_HEAD_FOLDER
    return folder if (folder / "config.json").is_file() else None


def shifted_features(hidden: torch.Tensor) -> torch.Tensor:
    """The feature each position reads: h[p-1], and zeros at position 0."""
    return torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)


def chain_mask(rows: int, depth: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, depth*rows, depth*rows) additive mask over `depth` blocks of `rows` chains: item (j, p)
    sees the first block's items s <= p and its own chain's items (i, p), 1 <= i <= j: what the draft's
    cache holds at depth j of the chain that starts at p."""
    row = torch.arange(rows, device=device)
    first = row[None, :] <= row[:, None]
    same = torch.eye(rows, dtype=torch.bool, device=device)
    none = torch.zeros_like(same)
    blocks = [[first if i == 0 else (same if i <= j else none) for i in range(depth)] for j in range(depth)]
    allowed = torch.cat([torch.cat(line, dim=1) for line in blocks], dim=0)[None, None]
    # additive, not bool: the eager attention adds the mask to its scores
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def run_chains(head: DraftHead, model: nn.Module, states: torch.Tensor, tokens: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """The head's draft features at depth 1..`depth` of the chain starting at every position p of
    each (B, T) window, given the teacher's states of the layers the head reads (B, T, n * H; top_hidden).

    Depth 1 at p reads (h[p-1], x[p]) and sits at position p; depth j reads the depth j-1 feature and
    x[p+j-1] at position p+j-1. On the teacher's own greedy text x[p+j-1] is the token the chain had to
    draft to get that far, so this is exactly what decoding computes. All chains of one depth run in
    one forward under a block mask. Returns `depth` tensors (B, T-j, H): row p holds the chain from p,
    whose draft is scored against the teacher's greedy token at position p+j.
    """
    decoder = model.model
    rows = tokens.shape[1]
    first = shifted_features(head.teacher_feature(states))
    outputs: list[torch.Tensor] = []
    for j in range(depth):
        items = rows - j
        features = torch.cat([first[:, :items]] + [outputs[i][:, :items] for i in range(j)], dim=1)
        ids = torch.cat([tokens[:, i: i + items] for i in range(j + 1)], dim=1)
        positions = torch.cat([torch.arange(items, device=tokens.device) + i for i in range(j + 1)])
        rope = decoder.rotary_emb(features, positions[None])
        mask = chain_mask(items, j + 1, features.dtype, features.device)  # depth 1: plain causal; explicit, whatever the attention
        out = head(features, decoder.embed_tokens(ids), rope, mask)
        outputs.append(out[:, j * items:])
    return outputs


def draft_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The teacher's norm and head on (teacher or draft) features, in the teacher's dtype."""
    return model.lm_head(model.model.norm(features.to(model.lm_head.weight.dtype)))


def top_hidden(model: nn.Module, ids: torch.Tensor, read_layers: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top hidden state (B, T, H) before the final norm (the decoder's own forward
    returns it after), and the outputs of `read_layers` side by side (B, T, n * H; default: the top
    alone, the same tensor). Every gate open for a skip model (the caller's teacher_mode)."""
    decoder = model.model
    read = read_layers or [len(decoder.layers) - 1]
    hidden = decoder.embed_tokens(ids)
    rope = decoder.rotary_emb(hidden, torch.arange(ids.shape[1], device=ids.device)[None])
    causal = chain_mask(ids.shape[1], 1, hidden.dtype, hidden.device)  # explicit: eager attention has no implicit one
    kept = []
    for index, layer in enumerate(decoder.layers):
        hidden = layer(hidden, position_embeddings=rope, attention_mask=causal)
        if index in read:
            kept.append(hidden)
    return hidden, kept[0] if len(kept) == 1 else torch.cat(kept, dim=-1)


def draft_head_for(model: nn.Module, draft: str = "auto") -> DraftHead | None:
    """The draft head saved in the folder `model` was loaded from (draft_head/), unless `draft` is
    "gates"; with "head" the model must have one."""
    from sparsify.generate_options import DRAFT_SOURCES

    if draft not in DRAFT_SOURCES:
        raise SparsifyError(f"--draft must be one of {', '.join(DRAFT_SOURCES)}, got '{draft}'")
    source = getattr(model, "name_or_path", "") or ""
    folder = find_draft_head(source) if draft != "gates" and source and Path(source).is_dir() else None
    if folder is None:
        if draft == "head":
            raise SparsifyError(f"{source or 'this model'} carries no draft head (draft_head/); make one with "
                                "`sparsify draft-head MODEL -o OUT --data TRAIN`, or draft with --draft gates")
        return None
    return DraftHead.load(folder, model)


def describe(head: DraftHead) -> str:
    """One line for reports."""
    trained = head.config.training
    tokens = f", trained on {trained['tokens_seen']:,} tokens" if trained.get("tokens_seen") else ", untrained"
    reads = f", reads layers {','.join(map(str, head.read_layers))}" if head.reduce is not None else ""
    return f"draft head (1 layer, from layer {head.config.init_from_layer}{reads}{tokens})"
