"""Block sizes for the decode engine's fused MoE sublayer (its expert kernels in
sparsify/experts/decode_kernel.py), chosen by measurement on the GPU machine; prints JSON.

Times one routed FFN sublayer (norm+route, gate_up, down+add) at the Llama-1B shape replayed in a
CUDA graph (so launch latency counts as it does in the engine) for each candidate block size,
beside the dense FFN sublayer as the engine runs it (sparsify/engine/fused_sublayers.py: its
one-kernel RMSNorm, the gate and up GEMVs, silu_mul, down with the residual add in the GEMM),
at batch 1, 4 and 16.

    python bench/tune_moe_decode.py --top-k 4,8
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

HIDDEN, D_FF, EXPERTS = 2048, 8192, 8
LAYERS = 16  # one graph replays this many sublayers, each with its own weights, so nothing is served from L2


def graph_us(run, repeats: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / LAYERS)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", default="2,4,8")
    parser.add_argument("--batches", default="1,4,16")
    args = parser.parse_args()
    from transformers import LlamaConfig, MixtralConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

    from sparsify.engine import decode_kernels, fused_sublayers
    from sparsify.engine.routed_ffn import RoutedFFN
    from sparsify.experts import decode_kernel, register

    register()
    attention = {"num_attention_heads": 32, "num_key_value_heads": 8}
    results = []
    dense = [LlamaDecoderLayer(LlamaConfig(hidden_size=HIDDEN, intermediate_size=D_FF, **attention), 0).cuda().bfloat16()
             for _ in range(LAYERS)]
    kernels = decode_kernels.DecodeKernels(torch.device("cuda"), torch.cuda.Stream())
    for batch in [int(b) for b in args.batches.split(",")]:
        hidden = torch.randn(batch, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)

        def dense_step():
            for layer in dense:
                fused_sublayers.dense_ffn(layer.mlp, kernels.rms_norm(layer.post_attention_layernorm, hidden), hidden)

        dense_us = graph_us(dense_step)
        results.append({"layout": "dense", "batch": batch, "us_per_sublayer": dense_us})
        for top_k in [int(k) for k in args.top_k.split(",")]:
            config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=D_FF // EXPERTS, num_local_experts=EXPERTS,
                                   num_experts_per_tok=top_k, **attention)
            config._experts_implementation = "sparsify"
            layers = [MixtralDecoderLayer(config, 0).cuda().bfloat16().eval() for _ in range(LAYERS)]
            for layer in layers:
                for parameter in layer.mlp.parameters():
                    torch.nn.init.normal_(parameter, std=0.02)
            routed = [RoutedFFN.of(layer, hidden)[0] for layer in layers]
            # gate_up (BLOCK_N, BLOCK_K); down at <= 4 tokens (multiply-and-sum) and at more (tl.dot)
            candidates = itertools.product([(32, 128), (32, 256)], [(8, 512), (4, 512), (8, 256)], [(16, 256), (16, 128)])
            for gate_up, few, down in candidates:
                if batch > decode_kernel.FEW_TOKENS and few != (8, 256) or batch <= decode_kernel.FEW_TOKENS and down != (16, 256):
                    continue  # the other path's block sizes do not change this batch's kernels
                decode_kernel.BLOCK_N, decode_kernel.BLOCK_K = gate_up
                decode_kernel.FEW_BLOCK_N, decode_kernel.FEW_BLOCK_K = few
                decode_kernel.DOWN_BLOCK_N, decode_kernel.DOWN_BLOCK_K = down

                def moe_step():
                    for sublayer in routed:
                        sublayer.add_to(hidden)

                try:
                    us = graph_us(moe_step)
                except Exception as error:  # noqa: BLE001 - a block size that does not compile is a result too
                    results.append({"layout": f"G=8 top-{top_k}", "batch": batch, "gate_up": gate_up, "down": few if batch <= decode_kernel.FEW_TOKENS else down,
                                    "error": str(error).splitlines()[0][:200]})
                    continue
                results.append({"layout": f"G=8 top-{top_k}", "batch": batch, "gate_up": gate_up,
                                "down": few if batch <= decode_kernel.FEW_TOKENS else down, "us_per_sublayer": us, "vs_dense": dense_us / us})
    print(json.dumps({"bench": "tune_moe_decode", "device": torch.cuda.get_device_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
