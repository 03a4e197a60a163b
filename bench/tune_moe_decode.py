"""Block sizes and warps for the decode engine's fused MoE sublayer (norm_route in
sparsify/engine/moe_kernels.py, the expert kernels in sparsify/experts/decode_kernel.py), chosen
by measurement on the GPU machine; prints JSON.

Times one routed FFN sublayer (norm+route, gate_up, down+add) at the Llama-1B shape replayed in a
CUDA graph (so launch latency counts as it does in the engine), beside the dense FFN sublayer as
the engine runs it (sparsify/engine/fused_sublayers.py: its one-kernel RMSNorm, the gate and up
GEMVs, silu_mul, down with the residual add in the GEMM), at batch 1, 2, 4 and 16. The knobs are
swept one at a time (coordinate descent from the shipped values), since their product is too
many compilations for one device call; `best` holds the values to ship per batch and top-k.

    python bench/tune_moe_decode.py --top-k 4,8 --batches 1,2

With --attention it tunes the attention sublayer instead (the one-launch norm + q/k/v projection and
the decode attention kernel of sparsify/engine/attention_kernels.py), against the same sublayer with
three cuBLAS projections and SDPA (FEW_TOKENS = 0), with a 256-token cache.

    python bench/tune_moe_decode.py --attention --batches 1,2
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


# knob (names of module constants) -> candidate values; which knobs apply depends on the batch
FEW_TOKEN_KNOBS = {
    ("PAIRS_DOWN_BLOCK_N", "PAIRS_DOWN_BLOCK_K", "PAIRS_DOWN_WARPS"): list(itertools.product([8, 16, 32], [64, 128, 256], [4, 8])),
    ("PAIR_BLOCK_N", "PAIR_BLOCK_K", "PAIR_WARPS"): list(itertools.product([8, 16, 32], [128, 256, 512], [4, 8])),
}
MANY_TOKEN_KNOBS = {
    ("BLOCK_N", "BLOCK_K"): [(32, 128), (32, 256), (16, 256), (64, 128)],
    ("DOWN_BLOCK_N", "DOWN_BLOCK_K"): [(16, 256), (16, 128), (32, 128)],
}
ROUTER_KNOBS = {("NUM_WARPS",): [(1,), (2,), (4,), (8,)]}
ATTENTION_KNOBS = {
    ("QKV_BLOCK_N", "QKV_BLOCK_K", "QKV_WARPS"): list(itertools.product([4, 8, 16], [128, 256, 512], [4, 8])),
    ("ATTENTION_BLOCK_L", "ATTENTION_WARPS"): list(itertools.product([16, 32, 64, 128], [1, 2, 4])),
}
KNOBS = {**FEW_TOKEN_KNOBS, **MANY_TOKEN_KNOBS, **ROUTER_KNOBS}


def knobs_for(batch: int, decode_kernel, moe_kernels):
    experts = FEW_TOKEN_KNOBS if batch <= decode_kernel.FEW_TOKENS else MANY_TOKEN_KNOBS
    return [(decode_kernel, names, values) for names, values in experts.items()] + \
           [(moe_kernels, names, values) for names, values in ROUTER_KNOBS.items()]


def set_knobs(module, setting: dict) -> None:
    for name, value in setting.items():
        setattr(module, name, value)


def sweep(run, knobs, reference_us: float, row: dict, results: list) -> dict:
    """Coordinate descent over `knobs` ((module, names, candidates), ...): each knob's best value is
    kept while the next is swept. Appends every trial to `results`; returns the best row."""
    chosen, us = {}, None
    for module, names, candidates in knobs:
        timed = []
        for values in candidates:
            setting = dict(zip(names, values))
            set_knobs(module, setting)
            try:
                trial = graph_us(run)
            except Exception as error:  # noqa: BLE001 - a setting that does not compile is a result too
                results.append({**row, **setting, "error": str(error).splitlines()[0][:200]})
                continue
            timed.append((trial, setting))
            results.append({**row, **setting, "us_per_sublayer": trial, "vs_reference": reference_us / trial})
        us, setting = min(timed, key=lambda pair: pair[0])
        set_knobs(module, setting)
        chosen.update(setting)
    return {**row, **chosen, "us_per_sublayer": us, "vs_reference": reference_us / us}


def tune_attention(batches: list[int]) -> dict:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from sparsify.engine import attention_kernels, decode_kernels, fused_sublayers

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=D_FF, num_attention_heads=32, num_key_value_heads=8)
    layers = [LlamaDecoderLayer(config, 0).cuda().bfloat16() for _ in range(LAYERS)]
    kernels = decode_kernels.DecodeKernels(torch.device("cuda"), torch.cuda.Stream())
    head_dim, max_len = HIDDEN // 32, 320
    cos, sin = torch.randn(2, max_len, head_dim, device="cuda", dtype=torch.bfloat16)
    position = torch.tensor([256], device="cuda")
    visible = (torch.arange(max_len, device="cuda") <= position)[None, None, None, :]
    shipped = {name: getattr(attention_kernels, name) for names in ATTENTION_KNOBS for name in names}
    shipped_threshold = attention_kernels.FEW_TOKENS
    if max(batches) > shipped_threshold:
        raise SystemExit(f"--attention tunes the kernels the engine runs, at up to {shipped_threshold} tokens")
    results, best = [], []
    for batch in batches:
        hidden = torch.randn(batch, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
        caches = [torch.randn(2, batch, 8, max_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in layers]

        scratches = {}  # per block of slots (a knob); made in the warm-up run, before the capture

        def step(fused: bool = True):
            block = attention_kernels.ATTENTION_BLOCK_L
            if fused and block not in scratches:
                scratches[block] = attention_kernels.AttentionScratch(caches[0][0], 32)
            scratch = scratches[block] if fused else None
            for layer, (keys, values) in zip(layers, caches):
                fused_sublayers.attend(layer.self_attn, layer.input_layernorm, hidden, position, cos, sin, keys, values, visible,
                                       kernels.rms_norm, scratch)

        attention_kernels.FEW_TOKENS = 0  # the reference: three cuBLAS projections and SDPA
        reference = graph_us(lambda: step(fused=False))
        attention_kernels.FEW_TOKENS = shipped_threshold
        results.append({"sublayer": "attention, cuBLAS q/k/v + SDPA", "batch": batch, "us_per_sublayer": reference})
        best.append(sweep(step, [(attention_kernels, names, values) for names, values in ATTENTION_KNOBS.items()], reference,
                          {"sublayer": "attention, fused", "batch": batch}, results))
        set_knobs(attention_kernels, shipped)
    return {"bench": "tune_moe_decode --attention", "device": torch.cuda.get_device_name(), "best": best, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", default="2,4,8")
    parser.add_argument("--batches", default="1,2,4,16")
    parser.add_argument("--attention", action="store_true", help="tune the attention sublayer's kernels instead")
    args = parser.parse_args()
    if args.attention:
        print(json.dumps(tune_attention([int(b) for b in args.batches.split(",")]), indent=1))
        return
    from transformers import LlamaConfig, MixtralConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

    from sparsify.engine import decode_kernels, fused_sublayers, moe_kernels
    from sparsify.engine.routed_ffn import RoutedFFN
    from sparsify.experts import decode_kernel, register

    register()
    attention = {"num_attention_heads": 32, "num_key_value_heads": 8}
    results, best = [], []
    shipped = [(module, {name: getattr(module, name) for names in KNOBS for name in names if hasattr(module, name)})
               for module in (decode_kernel, moe_kernels)]
    dense = [LlamaDecoderLayer(LlamaConfig(hidden_size=HIDDEN, intermediate_size=D_FF, **attention), 0).cuda().bfloat16()
             for _ in range(LAYERS)]
    kernels = decode_kernels.DecodeKernels(torch.device("cuda"), torch.cuda.Stream())
    for batch in [int(b) for b in args.batches.split(",")]:
        hidden = torch.randn(batch, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)

        def dense_step():
            for layer in dense:
                fused_sublayers.dense_ffn(layer.mlp, kernels.rms_norm(layer.post_attention_layernorm, hidden), hidden)

        dense_us = graph_us(dense_step)
        results.append({"layout": "dense", "batch": batch, "us_per_sublayer": dense_us})  # the reference
        for top_k in [int(k) for k in args.top_k.split(",")]:
            config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=D_FF // EXPERTS, num_local_experts=EXPERTS,
                                   num_experts_per_tok=top_k, **attention)
            config._experts_implementation = "sparsify"
            layers = [MixtralDecoderLayer(config, 0).cuda().bfloat16().eval() for _ in range(LAYERS)]
            for layer in layers:
                for parameter in layer.mlp.parameters():
                    torch.nn.init.normal_(parameter, std=0.02)
            routed = [RoutedFFN.of(layer, hidden)[0] for layer in layers]

            def moe_step():
                for sublayer in routed:
                    sublayer.add_to(hidden)

            best.append(sweep(moe_step, knobs_for(batch, decode_kernel, moe_kernels), dense_us,
                              {"layout": f"G=8 top-{top_k}", "batch": batch}, results))
            for module, values in shipped:
                set_knobs(module, values)
    print(json.dumps({"bench": "tune_moe_decode", "device": torch.cuda.get_device_name(), "best": best, "results": results}, indent=1))


if __name__ == "__main__":
    main()
