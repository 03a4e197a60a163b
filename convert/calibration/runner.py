"""The dense model run one decoder layer at a time on calibration text.

Only one layer's weights are ever materialised (the skeleton is built on the meta device and each
layer is filled from the source's lazy tensor reader, then emptied again), so calibration keeps the
conversion's memory bound: the weights of one layer plus the calibration activations
(a few copies of tokens x hidden). For every layer the caller gets the FFN's input, i.e. the
post-attention-norm hidden states of every calibration token, and the layer's dense FFN weights;
what it decides from them (a neuron order, router rows, neurons to keep) stays small.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from sparsify.convert.base import SKIPPED
from sparsify.convert.calibration.options import CalibrationOptions
from sparsify.errors import SparsifyError
from sparsify.families import FFN_ROLES, family_for

SEQUENCES_PER_FORWARD = 8


@dataclass
class LayerActivity:
    """What one dense layer saw on the calibration text."""

    layer: int
    ffn_input: torch.Tensor  # (tokens, hidden), float32: the FFN's input (after the post-attention norm)
    ffn: dict[str, torch.Tensor]  # gate (d_ff, hidden), up (d_ff, hidden), down (hidden, d_ff), float32, on the same device
    # Set by the consumer: the FFN that replaces the dense one, (tokens, hidden) -> (tokens, hidden). The next
    # layer then sees the converted model's activations (errors do not compound unseen, as in GPTQ's
    # sequential mode); left None, it sees the dense model's.
    converted_ffn: Callable[[torch.Tensor], torch.Tensor] | None = None


def calibration_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def calibration_blocks(source: Any, options: CalibrationOptions) -> torch.Tensor:
    """(sequences, seq_len) token ids of the calibration text, read with the source's tokenizer."""
    return text_blocks(options.calibration_sources, source.tokenizer(), options.calibration_token_count, options.calibration_seq_len,
                       options.calibration_field)


def text_blocks(sources: tuple[str, ...] | list[str], tokenizer: Any, tokens: int, seq_len: int, text_field: str = "text") -> torch.Tensor:
    """(sequences, seq_len) token ids of the first `tokens` tokens of `sources`. Documents in training's
    default held-out bucket are skipped, so calibrating on the training files never looks at the text
    training later evaluates on."""
    import numpy as np

    from sparsify.data import DataSpec, split_documents, tokenize_stream

    spec = DataSpec(tuple(sources), text_field=text_field)
    chunks = list(tokenize_stream(split_documents(spec, heldout=False), tokenizer, tokens))
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    sequences = len(ids) // seq_len
    if sequences == 0:
        raise SparsifyError(f"--calibration-data holds {len(ids)} tokens, fewer than one --calibration-seq-len sequence "
                            f"({seq_len}); pass more text or a shorter --calibration-seq-len")
    return torch.from_numpy(ids[: sequences * seq_len].astype(np.int64)).view(sequences, -1)


def _skeleton(config: Any):
    """The dense model's modules without memory: layers are filled one at a time."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"  # with no mask, causal attention by is_causal (no mask tensor built)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config), config


def layer_activity(source: Any, blocks: torch.Tensor, device: torch.device | None = None,
                   on_layer: Callable[[int, int], None] = lambda done, total: None) -> Iterator[LayerActivity]:
    """Yield every layer's FFN inputs on `blocks`, layer by layer. Layer i+1's inputs are computed once the
    caller is done with layer i: from the FFN the caller set as `converted_ffn`, else from the dense one."""
    device = device or calibration_device()
    reader, family = source.tensors, family_for(source.config.model_type)
    model, config = _skeleton(source.config)
    layers = model.model.layers
    # fp32 on CPU (bf16 matmuls there are slow and lossy); the GPU runs in bf16 with fp32 statistics.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    embed = reader.get("model.embed_tokens.weight").to(device, dtype)
    hidden = torch.nn.functional.embedding(blocks.to(device), embed)
    del embed
    rotary = type(model.model.rotary_emb)(config=config).to(device)
    positions = torch.arange(blocks.shape[1], device=device)[None]
    cos_sin = rotary(hidden[:1], positions)
    names = reader.names()
    for index, layer in enumerate(layers):
        prefix = family.layer_name(index, "")
        state = {name[len(prefix):]: reader.get(name).to(device, dtype) for name in names if name.startswith(prefix) and not SKIPPED.search(name)}
        layer.to_empty(device=device)
        layer.load_state_dict(state, strict=True)
        inputs: list[torch.Tensor] = []
        residual = torch.empty_like(hidden)  # the stream after attention, before the FFN adds to it
        hooks = [layer.mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0].reshape(-1, args[0].shape[-1]).float())),
                 layer.post_attention_layernorm.register_forward_pre_hook(lambda module, args: residual_chunks.append(args[0]))]
        residual_chunks: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, hidden.shape[0], SEQUENCES_PER_FORWARD):
                chunk = hidden[start : start + SEQUENCES_PER_FORWARD]
                out = layer(chunk, position_embeddings=tuple(t.expand(chunk.shape[0], *t.shape[1:]) for t in cos_sin),
                            position_ids=positions.expand(chunk.shape[0], -1), attention_mask=None)
                residual[start : start + SEQUENCES_PER_FORWARD] = residual_chunks.pop()
                hidden[start : start + SEQUENCES_PER_FORWARD] = out[0] if isinstance(out, tuple) else out
        for hook in hooks:
            hook.remove()
        ffn = {role: state[family.dense_ffn[role]].float() for role in FFN_ROLES}
        del state
        layer.to("meta")  # frees this layer's weights
        activity = LayerActivity(index, torch.cat(inputs), ffn)
        inputs.clear()  # the chunks, now copied into one tensor
        yield activity
        if activity.converted_ffn is not None:
            with torch.inference_mode():
                update = activity.converted_ffn(activity.ffn_input).view(hidden.shape)
                hidden = (residual.float() + update).to(dtype)
        del residual
        on_layer(index + 1, len(layers))
