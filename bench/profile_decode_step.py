"""Where one decode step of the CUDA-graph engine (or, with --prefill, one prefill) spends its GPU time, dense against MoE layouts.

The engine's eager GPU step launches the same kernels its graph replays, so a torch.profiler trace
of eager steps gives each kernel's GPU time; the replayed graph's step time beside it says how much
of the step is kernels and how much is the gaps between them. Prints JSON: per model, the graph
step, the summed kernel time per step, the kernel count per step and the top kernels.

    python bench/profile_decode_step.py --shape llama-1b --layouts "fine-moe G=8 top-4,fine-moe G=8 top-8"

With --prefill it profiles the model's own forward over the prompt (what the engine's prefill and
`sparsify eval` time): its wall time, the summed kernel time and their ratio, which says whether
the prefill is bound by the GPU or by the host launching it.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import moe_speed  # noqa: E402


def kernel_table(run, steps: int) -> tuple[dict[str, float], int]:
    """GPU microseconds per call by kernel name, and kernels per call, over `steps` calls of `run`."""
    activity = torch.profiler.ProfilerActivity.CUDA
    with torch.profiler.profile(activities=[activity]) as profile:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    per_name: dict[str, float] = collections.defaultdict(float)
    count = 0
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_name[event.name] += event.device_time / steps
            count += 1
    return dict(per_name), count // steps


def profile_model(model, batch: int, prompt_len: int, steps: int) -> dict:
    from sparsify.engine.graph_decode import GraphDecoder

    ids = torch.randint(0, moe_speed.VOCAB, (batch, prompt_len), device=moe_speed.DEVICE)
    max_len = prompt_len + 2 * steps + 8
    graph = GraphDecoder(model, batch=batch, max_len=max_len)
    times = []
    for repeat in range(6):  # each repeat from a fresh prefill, so the cache never overflows; the first warms up
        graph.prefill(ids)
        graph.step()
        times.append(moe_speed.cuda_ms(lambda: [graph.step() for _ in range(steps)]) / steps)
    times = times[1:]
    eager = GraphDecoder(model, batch=batch, max_len=max_len, use_graph=False)
    eager.prefill(ids)
    with torch.no_grad():
        eager._step()
        kernels, count = kernel_table(eager._step, steps)
    return {"graph_step_us": 1000 * statistics.median(times), "kernel_us_per_step": sum(kernels.values()),
            "kernels_per_step": count, "top_kernels_us": _top(kernels)}


def profile_prefill(model, batch: int, prompt_len: int, repeats: int) -> dict:
    ids = torch.randint(0, moe_speed.VOCAB, (batch, prompt_len), device=moe_speed.DEVICE)
    with torch.no_grad():
        def run():
            return model(input_ids=ids, use_cache=True)

        run()
        wall = statistics.median(moe_speed.cuda_ms(run) for _ in range(repeats))
        kernels, count = kernel_table(run, repeats)
    gpu_us = sum(kernels.values())
    return {"wall_us": 1000 * wall, "kernel_us": gpu_us, "gpu_busy": gpu_us / (1000 * wall), "kernels": count,
            "top_kernels_us": _top(kernels)}


def _top(kernels: dict[str, float]) -> list:
    top = sorted(kernels.items(), key=lambda item: -item[1])
    return [[name[:90], round(us, 1)] for name, us in top[:20]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--layouts", default="fine-moe G=8 top-4,fine-moe G=8 top-8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill", action="store_true", help="profile the prompt's forward instead of a decode step")
    args = parser.parse_args()
    from sparsify.experts import register

    register()
    report = {"bench": "profile_decode_step", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "settings": vars(args), "models": {}}
    for layout in moe_speed.layouts_named(args.layouts):
        model = moe_speed.build_model(args.shape, layout)
        if layout is not None:
            model.set_experts_implementation("sparsify")
        name = "dense" if layout is None else layout.name
        if args.prefill:
            report["models"][name] = profile_prefill(model, args.batch, args.prompt_len, args.steps)
        else:
            report["models"][name] = profile_model(model, args.batch, args.prompt_len, args.steps)
        del model
        torch.cuda.empty_cache()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
