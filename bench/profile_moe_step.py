"""Where one router-training step of an MoE spends its GPU time: the top CUDA kernels of one
`bench/moe_speed.py --phase train` step under torch.profiler, for a layout and implementation.

    python bench/profile_moe_step.py --layout "fine-moe G=8 top-4" --implementation sparsify
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import moe_speed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--layout", default="fine-moe G=8 top-4")
    parser.add_argument("--implementation", default="sparsify")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    layout = next(item for item in moe_speed.LAYOUTS if item.name.startswith(args.layout))
    model, decisions, optimizer, ids = moe_speed.router_training(args.shape, layout, args.implementation, batch=4, seq_len=1024)
    for _ in range(3):
        moe_speed.router_training_step(model, decisions, ids, optimizer)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as profile:
        moe_speed.router_training_step(model, decisions, ids, optimizer)
        torch.cuda.synchronize()
    print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
