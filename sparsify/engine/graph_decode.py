"""Greedy decoding with a static KV cache, each step replayed as one CUDA graph.

Why: transformers' eager decode of a small model is bound by the host (about a thousand kernel
launches per token for SmolLM2-135M, the GPU busy a tenth of the time), so a skipped sublayer
saves launches rather than GPU work, and the host round trip each gate needs to decide costs
more than the sublayer. Here the whole step (embedding, every layer, the head, the argmax that
picks the next token) is captured once and replayed, and each gated sublayer becomes a CUDA
graph conditional node: the gate's decision is read on the GPU, and a skipped sublayer's kernels
never run, with no host synchronisation at all. Dense models go through the same engine, so a
skip model and its teacher are timed under one harness. Each RMSNorm is one kernel (eight in
transformers), and a gated sublayer's norm kernel also evaluates the gate and sets the IF node's
condition (sparsify/engine/decode_kernels.py), so a gate adds one conditional node and no kernel.
On a GPU, ungated sublayers run with fewer kernels (sparsify/engine/fused_sublayers.py) and an
MoE model's routed FFN as three fused kernels (sparsify/engine/routed_ffn.py); on CPU the step is
the model's own modules.

Decisions are the skip model's own (same gate, same threshold, same KV rule: a skipped
attention sublayer still writes the token's keys and values). At batch > 1 a sublayer runs when
any sequence keeps it, and its output is masked per sequence (it saves work only when every
sequence skips).

Without CUDA (or with `use_graph=False`) the same step runs eagerly, deciding on the host; that
is how the engine is tested against the model's own forward pass on CPU.

Supported: Llama-style decoders (Llama, Mistral, Qwen2, Qwen3 and skip models over them), prompts
without padding, lengths within a sliding window if the model has one.
"""

from __future__ import annotations

from collections.abc import Callable
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.engine import attention_kernels, decode_kernels, fused_sublayers
from sparsify.engine.routed_ffn import RoutedFFN
from sparsify.experts import decode_kernel
from sparsify.convert.skip.modeling_skip import returned_cache, rotate_heads


@dataclass
class _Layer:
    index: int
    block: nn.Module
    attention_gate: nn.Module | None
    ffn_gate: nn.Module | None
    routed: RoutedFFN | None = None  # an MoE FFN run as three fused kernels (sparsify/engine/routed_ffn.py)
    fused_attention: bool = False  # sparsify/engine/fused_sublayers.py
    fused_mlp: bool = False


@dataclass
class _Decision:
    """One gated sublayer's decision in this step."""

    keep: torch.Tensor | None = None  # eager: per-sequence keep (the host reads it)
    handle: int | None = None  # captured: the conditional handle the gate kernel sets at every replay
    mask: torch.Tensor | None = None  # batch > 1: per-sequence 0/1 in the model's dtype, applied to the output


def graphs_supported() -> bool:
    """A GPU and the engine's CUDA kernels (sparsify/engine/decode_kernels.py), conditional nodes
    included."""
    return decode_kernels.available()


def _check_supported(model: nn.Module) -> None:
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    needed = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    if layers is None or not hasattr(decoder, "rotary_emb") or not all(hasattr(layers[0], n) for n in needed):
        raise SparsifyError(
            f"the CUDA-graph decode engine supports Llama-style decoders (llama, mistral, qwen2, qwen3 and skip models "
            f"over them); {type(model).__name__} is not one - time it with the default engine"
        )
    attention = layers[0].self_attn
    if not all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
        raise SparsifyError(f"{type(attention).__name__} does not have the q/k/v/o projections the decode engine needs")


def _skip_gates(model: nn.Module) -> dict[tuple[int, str], nn.Module]:
    """(layer, "attention" | "ffn") -> gate, through the skip model's public `skip_gates()`; empty
    for a dense model."""
    listed = model.skip_gates() if hasattr(model, "skip_gates") else []
    return {(layer, sublayer): gate for layer, sublayer, gate in listed}


def _add_output(hidden: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None) -> None:
    """hidden += out, per sequence where `mask` is given (one kernel either way). A skipped
    sequence gets out * 0: exact unless the sublayer overflowed to inf for it (fp16), which the
    model's own forward, not running the sublayer for it, would not see."""
    if mask is None:
        hidden.add_(out)
    else:
        hidden.addcmul_(out, mask)


class GraphDecoder:
    """Greedy decode for `batch` sequences of up to `max_len` tokens (prompt + generated).

    The gates' thresholds and frozen decisions are read when the decoder is built and the step
    captured: after changing them, build a new decoder."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, use_graph: bool | None = None, skipped_kv: bool = True):
        """`skipped_kv=False`: a sublayer whose gate is frozen closed costs nothing at all, not even
        its attention's K/V write. Only for callers that never let a later token read those slots
        (a speculative draft, whose slots verification rewrites)."""
        _check_supported(model)
        self.skipped_kv = skipped_kv
        window = getattr(model.config, "sliding_window", None)
        if window and max_len > window:
            raise SparsifyError(f"the decode engine does not apply sliding windows: keep prompt + new tokens <= {window}")
        self.model, self.batch, self.max_len = model, batch, max_len
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        decoder = model.model
        gates = _skip_gates(model)
        self.layers = [_Layer(i, block, gates.get((i, "attention")), gates.get((i, "ffn"))) for i, block in enumerate(decoder.layers)]
        evaluated = [g for layer in self.layers for g in (layer.attention_gate, layer.ffn_gate) if g is not None and g.forced is None]
        self.gated = bool(evaluated)
        self.capture_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # The fused kernels serve the eager GPU step too, so eager and replayed steps compute alike.
        self.kernels = self._load_kernels(decoder, evaluated)
        self.routed_ffn_skipped = self._route_ffns()
        self._plan_fused_sublayers()
        supported = self.device.type == "cuda" and (self.kernels is not None or not self.gated)
        self.use_graph = supported if use_graph is None else use_graph
        if self.use_graph and not supported:
            raise SparsifyError("the graph decode engine needs the model on a GPU and, for gated models, nvcc (CUDA >= 12.4) "
                                "to build its kernels; use --decode-engine hf")
        # Per evaluated gate: the kernel's two counters (zero between replays) and, at batch > 1, its mask.
        self.gate_slots = {id(g): i for i, g in enumerate(evaluated)}
        self.scratch = torch.zeros(len(evaluated), 2, dtype=torch.int32, device=self.device)
        self.masks = torch.zeros(len(evaluated), batch, 1, 1, dtype=self.dtype, device=self.device)
        config = model.config
        attention = decoder.layers[0].self_attn
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        shape = (batch, kv_heads, max_len, attention.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        # At batch 1-2 (and caches up to MAX_KERNEL_CACHE) fused attention runs the decode attention
        # kernel; its scratch serves every layer.
        self.heads = attention.q_proj.weight.shape[0] // attention.head_dim
        fused = any(layer.fused_attention for layer in self.layers)
        self.attention_scratch = attention_kernels.scratch_where_it_fits(self.keys[0], self.heads) if fused else None
        with torch.no_grad():
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = decoder.rotary_emb(torch.zeros((), dtype=self.dtype, device=self.device), positions)
        self.cos_table, self.sin_table = cos[0], sin[0]
        self.slots = torch.arange(max_len, device=self.device)
        self.fp32_head = self._fp32_head_possible()
        # Step state lives in fixed buffers so one captured graph serves every step.
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.history = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._capturing = False
        self._force_bodies = False
        self.decisions: list[torch.Tensor] | None = None  # set to [] to collect eager steps' keep masks

    def _load_kernels(self, decoder: nn.Module, evaluated: list[nn.Module]) -> decode_kernels.DecodeKernels | None:
        """The fused kernels where they apply; None on CPU, or (dense and frozen-gate models only)
        where they cannot be built or the norms are not the kind they fuse."""
        if self.device.type != "cuda" or not decode_kernels.available():
            return None
        norms = [m for layer in decoder.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)] + [decoder.norm]
        problem = None
        if not all(decode_kernels.fusable_norm(norm, self.dtype) for norm in norms):
            problem = f"its norms ({type(norms[0]).__name__}, weights in {norms[0].weight.dtype}) are not ones the kernels fuse"
        elif any(g.weight.dtype != torch.float32 or g.bias.dtype != torch.float32 for g in evaluated):
            problem = "its gates are not in fp32 (load the model with from_pretrained, which keeps them fp32)"
        else:
            try:
                return decode_kernels.DecodeKernels(self.device, self.capture_stream)
            except SparsifyError as error:
                problem = str(error)
        if evaluated:
            raise SparsifyError(f"the graph decode engine cannot evaluate this model's gates on the GPU: {problem}; use --decode-engine hf")
        warnings.warn(f"decode engine: plain transformers norms, no fused kernels ({problem})", stacklevel=3)
        return None

    def _route_ffns(self) -> str | None:
        """Give each ungated MoE layer its fused sublayer where it applies; returns why one could
        not have it (None: every MoE layer has it, or the model has none)."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        missed = None
        for layer in self.layers:
            if layer.ffn_gate is not None or not hasattr(layer.block.mlp, "experts"):
                continue
            routed, reason = RoutedFFN.of(layer.block, probe)
            if routed is not None and not routed.fits(self.batch):
                reason = f"batch {self.batch} x top-{routed.top_k} is more pairs than the decode kernels take"
                routed = None
            layer.routed = routed
            missed = missed or (reason or None)
        return missed

    def fusable(self, layer: _Layer) -> tuple[bool, bool]:
        """Whether the layer's attention and FFN can run with fewer kernels, its gates aside: the
        engine's own norm kernels run (a GPU), Triton is there, and the modules are the kinds the fused
        sublayers take. The step fuses them where no gate decides; a speculative verification, which
        runs every sublayer, wherever this says."""
        if self.kernels is None or not decode_kernel.available(torch.empty(0, dtype=self.dtype, device=self.device)):
            return False, False
        block = layer.block
        return (fused_sublayers.attention_fusable(block.self_attn, self.dtype),
                layer.routed is None and fused_sublayers.mlp_fusable(block.mlp))

    def _plan_fused_sublayers(self) -> None:
        """Ungated attention and dense FFN sublayers with fewer kernels where `fusable`; on CPU the
        step stays the model's own modules."""
        def runs_plainly(gate: nn.Module | None) -> bool:  # ungated, or frozen open: nothing to evaluate
            return gate is None or gate.forced is True

        for layer in self.layers:
            attention, mlp = self.fusable(layer)
            layer.fused_attention = runs_plainly(layer.attention_gate) and attention
            layer.fused_mlp = runs_plainly(layer.ffn_gate) and mlp

    @property
    def routed_ffn_kernels(self) -> bool:
        """Whether MoE layers decode through the fused routed-FFN kernels."""
        return any(layer.routed is not None for layer in self.layers)

    # -- the step ---------------------------------------------------------------------------------
    def _norm(self, norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(norm, hidden) if self.kernels is not None else norm(hidden)

    def _norm_and_decide(self, norm: nn.Module, hidden: torch.Tensor, gate: nn.Module | None) -> tuple[torch.Tensor, _Decision | None]:
        """The sublayer's normalised input and, for an evaluated gate, its decision."""
        if gate is None or gate.forced is not None:
            if gate is not None and self.decisions is not None and not self._capturing and not self._force_bodies:
                self.decisions.append(torch.full((self.batch,), gate.forced, device=self.device))  # frozen: counted too
            return self._norm(norm, hidden), None
        slot = self.gate_slots[id(gate)]
        mask = self.masks[slot] if self.batch > 1 else None
        if self._capturing:  # one kernel: norm, gate, mask, and the IF node's condition
            normed, handle = self.kernels.norm_gate(norm, hidden, gate, mask, self.scratch[slot])
            return normed, _Decision(handle=handle, mask=mask)
        if self.kernels is None:  # CPU: the model's own modules
            normed = norm(hidden)
            keep = gate(normed)[1]
            mask = keep[..., None].to(normed.dtype) if mask is not None else None
        else:  # eager GPU step: the same kernel as in the graph, its mask read on the host
            keep = self.masks[slot]
            normed, _ = self.kernels.norm_gate(norm, hidden, gate, keep)
        if self.decisions is not None and not self._force_bodies:
            self.decisions.append(keep.reshape(-1).bool().clone())
        return normed, _Decision(keep=keep, mask=mask)

    def _run_if(self, gate: nn.Module | None, decision: _Decision | None, body: Callable[[torch.Tensor | None], None]) -> None:
        """Run `body` when the gate keeps the token (any sequence at batch > 1). `body` gets the
        per-sequence keep mask to apply to its output (None: no masking needed)."""
        if decision is None:  # ungated, or a fixed decision (teacher mode, frozen gates): nothing to evaluate
            if gate is None or gate.forced:
                body(None)
            return
        if self._capturing:  # decided on the GPU at every replay, by the kernel that set the handle
            with self.kernels.if_node(decision.handle):
                body(decision.mask)
        elif self._force_bodies:  # warm-up before capture: every body runs once, on the stream it is captured on
            current = torch.cuda.current_stream(self.device)
            self.kernels.body_stream.wait_stream(current)
            with torch.cuda.stream(self.kernels.body_stream):
                body(decision.mask)
            current.wait_stream(self.kernels.body_stream)
        elif bool(decision.keep.any()):  # the host decides (eager step): one synchronisation
            body(decision.mask)

    def _step(self) -> None:
        decoder = self.model.model
        hidden = decoder.embed_tokens(self.token)
        if not all(layer.fused_attention for layer in self.layers):  # the fused kernel reads the tables itself
            cos = self.cos_table.index_select(0, self.position)[None]
            sin = self.sin_table.index_select(0, self.position)[None]
        # Only SDPA reads the mask: with every layer on the decode attention kernel it is not built.
        all_on_kernel = self.attention_scratch is not None and all(layer.fused_attention for layer in self.layers)
        visible = None if all_on_kernel else (self.slots <= self.position)[None, None, None, :]
        for layer in self.layers:
            block, attention = layer.block, layer.block.self_attn
            if self._costs_nothing(layer.attention_gate):
                self._ffn(layer, hidden)
                continue
            if layer.fused_attention:
                fused_sublayers.attend(attention, block.input_layernorm, hidden, self.position, self.cos_table, self.sin_table,
                                       self.keys[layer.index], self.values[layer.index], visible, self._norm, self.attention_scratch)
                self._ffn(layer, hidden)
                continue
            normed, decision = self._norm_and_decide(block.input_layernorm, hidden, layer.attention_gate)
            shape = (self.batch, 1, -1, attention.head_dim)
            keys = attention.k_proj(normed).view(shape)
            if hasattr(attention, "k_norm"):
                keys = attention.k_norm(keys)
            self.keys[layer.index].index_copy_(2, self.position, rotate_heads(keys.transpose(1, 2), cos, sin))
            self.values[layer.index].index_copy_(2, self.position, attention.v_proj(normed).view(shape).transpose(1, 2))

            def attend(mask, attention=attention, normed=normed, index=layer.index):
                queries = attention.q_proj(normed).view(self.batch, 1, -1, attention.head_dim)
                if hasattr(attention, "q_norm"):
                    queries = attention.q_norm(queries)
                queries = rotate_heads(queries.transpose(1, 2), cos, sin)
                out = F.scaled_dot_product_attention(queries, self.keys[index], self.values[index], attn_mask=visible,
                                                     scale=attention.scaling, enable_gqa=True)
                _add_output(hidden, attention.o_proj(out.transpose(1, 2).reshape(self.batch, 1, -1)), mask)

            self._run_if(layer.attention_gate, decision, attend)
            self._ffn(layer, hidden)
        logits = self.head(self._norm(decoder.norm, hidden))
        self.position.add_(1)
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.history.index_copy_(1, self.position, self.token)
        self.last_logits = logits

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """The logits of `normed` (..., H): in fp32 from the half-precision weights where cuBLAS can
        (fp32_head), else in the model's dtype. Why: in bf16 the two best logits of a step tie
        exactly now and then (near 20 they are 0.125 apart), and which one argmax takes then depends
        on rounding that a speculative verification of several tokens does not share with a one-token
        step; in fp32 exact ties all but vanish."""
        if not self.fp32_head:
            return self.model.lm_head(normed)
        rows = normed.reshape(-1, normed.shape[-1])
        return torch.mm(rows, self.model.lm_head.weight.t(), out_dtype=torch.float32).view(*normed.shape[:-1], -1)

    def _fp32_head_possible(self) -> bool:
        head = getattr(self.model, "lm_head", None)
        if self.device.type != "cuda" or self.dtype not in (torch.bfloat16, torch.float16):
            return False
        if not isinstance(head, nn.Linear) or head.bias is not None:
            return False
        try:  # cuBLAS half -> fp32 output (torch.mm's out_dtype, torch >= 2.8 on CUDA)
            probe = torch.ones(1, 8, dtype=self.dtype, device=self.device)
            return torch.mm(probe, probe.t(), out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            return False

    def _costs_nothing(self, gate: nn.Module | None) -> bool:
        return not self.skipped_kv and gate is not None and gate.forced is False

    def _ffn(self, layer: _Layer, hidden: torch.Tensor) -> None:
        block = layer.block
        if self._costs_nothing(layer.ffn_gate):
            return
        if layer.routed is not None:
            layer.routed.add_to(hidden)
        elif layer.fused_mlp:
            fused_sublayers.dense_ffn(block.mlp, self._norm(block.post_attention_layernorm, hidden), hidden)
        else:
            normed, decision = self._norm_and_decide(block.post_attention_layernorm, hidden, layer.ffn_gate)
            self._run_if(layer.ffn_gate, decision, lambda mask: _add_output(hidden, block.mlp(normed), mask))

    # -- public -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        """Run the prompt through the model's own forward pass and copy its cache into the static one."""
        if ids.shape[0] != self.batch or ids.shape[1] >= self.max_len:
            raise SparsifyError(f"prompt of shape {tuple(ids.shape)} does not fit a decoder for batch {self.batch}, {self.max_len} tokens")
        out = self.model(input_ids=ids, use_cache=True)
        length = ids.shape[1]
        for index, layer in enumerate(returned_cache(out).layers):  # transformers 5.x cache layers
            self.keys[index][:, :, :length].copy_(layer.keys)
            self.values[index][:, :, :length].copy_(layer.values)
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.history[:, :length].copy_(ids)
        self.history[:, length].copy_(self.token[:, 0])
        self.position.fill_(length)  # where the token the next step feeds in sits

    @torch.no_grad()
    def step(self) -> None:
        """Feed the last chosen token, choose the next one."""
        if self.use_graph:
            if self.graph is None:
                self.graph = self._capture()  # only a finished capture is ever replayed
            self.graph.replay()
        else:
            self._step()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation: the prompt followed by `new_tokens` tokens (the first from prefill)."""
        self.prefill(ids)
        for _ in range(new_tokens - 1):
            self.step()
        end = ids.shape[1] + new_tokens
        return self.history[:, :end].clone()

    def _capture(self, program: Callable[[], None] | None = None, state: tuple[torch.Tensor, ...] = ()) -> torch.cuda.CUDAGraph:
        """Capture `program` (default: one step) as one graph; the decoder's state, and the caller's
        `state` buffers, are as before."""
        program = program or self._step
        stream = self.capture_stream
        buffers = (self.token, self.position, self.history, *state)
        saved = [t.clone() for t in buffers]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up on a side stream, every branch taken, as capture requires
            self._force_bodies = True
            try:
                program()
            finally:
                self._force_bodies = False
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for buffer, before in zip(buffers, saved, strict=True):
            buffer.copy_(before)  # the warm-up's cache write lands on the slot the first real step overwrites
        graph = torch.cuda.CUDAGraph()
        self._capturing = True
        try:
            with torch.cuda.graph(graph, stream=stream):
                program()
        finally:
            self._capturing = False
        return graph


def time_decode_steps(model: nn.Module, ids: torch.Tensor, steps: int, *, warmup: int, repeats: int,
                      use_graph: bool | None = None, skipped_kv: bool = True) -> tuple[list[float], GraphDecoder]:
    """Seconds per decode step, one figure per repeat: each repeat prefills `ids` (untimed), then
    times `steps` back-to-back steps. The graph is captured once, during the warm-up. Also returns
    the engine, which says what ran: CUDA graphs or not (not on CPU, nor for gated models without
    nvcc), fused MoE sublayers or the model's own blocks."""
    import time

    engine = GraphDecoder(model, batch=ids.shape[0], max_len=ids.shape[1] + steps + 1, use_graph=use_graph, skipped_kv=skipped_kv)
    cuda = engine.device.type == "cuda"

    def once() -> float:
        engine.prefill(ids)
        if cuda:
            torch.cuda.synchronize(engine.device)
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize(engine.device)
        return (time.perf_counter() - started) / steps

    for _ in range(max(warmup, 1)):
        once()
    return [once() for _ in range(repeats)], engine
