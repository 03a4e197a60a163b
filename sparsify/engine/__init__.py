"""The decode engine: greedy decoding with a static KV cache, each step replayed as one CUDA graph.

A runtime, not a measurement: `sparsify eval --decode-engine graph` and `skip-sweep` time decode
with it, and it can be used on its own to decode a dense or layer-skip model. Gated sublayers of a
skip model become CUDA graph conditional nodes whose condition a fused RMSNorm-and-gate kernel sets,
so a skipped sublayer's kernels never run and no decision reaches the host; the engine reads the
gates only through the skip model's public API (`skip_gates()`, each gate's `weight`, `bias`,
`logit_threshold` and `forced`).

MoE models decode through it too, their routed FFN sublayer as three fused kernels.

Modules: graph_decode (the engine: `GraphDecoder`, `time_decode_steps`), decode_kernels (the CUDA
kernels and IF nodes of cuda/decode_kernels.cu, built with nvcc on first use and cached),
routed_ffn + moe_kernels (the MoE sublayer: norm+route, gate_up, down+add in Triton),
fused_sublayers + attention_kernels (ungated attention and dense FFN with fewer kernels: one
rope-and-cache kernel, silu_mul, residual adds inside the GEMMs).
"""

from sparsify.engine.graph_decode import GraphDecoder, graphs_supported, time_decode_steps

__all__ = ["GraphDecoder", "graphs_supported", "time_decode_steps"]
