"""Multi-GPU router training (run on a machine with 2+ GPUs): the same run on one process, under
`accelerate launch` DDP and under FSDP2 on N processes. Prints JSON with each run's held-out
results, loss curve ends, throughput and peak GPU memory of process 0.

    python bench/train_distributed.py --tokenizer TOKENIZER_DIR --data train.jsonl.gz --eval-data valid.jsonl.gz

The model is a random-weight Llama of the chosen shape, converted to fine-moe G=4 top-2 (half the
FFN active); random weights are enough to compare the three ways of running it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "small": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2},
    # Llama-3.2-1B-like: ~1.2B dense parameters, ~2B after conversion (bf16 weights 4 GB).
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8},
}


def _launch(mode: str, processes: int) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
              "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    return {
        "single": [sys.executable],
        "ddp": [*launch, "--multi_gpu"],
        "fsdp2": [*launch, "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                  "--fsdp_reshard_after_forward", "true"],
    }[mode]


def _summary(out: Path) -> dict:
    record = json.loads((out / "sparsify.json").read_text())["training"][-1]
    log = [json.loads(line) for line in (out.parent / f"{out.name}.run" / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "tokens_per_s" in e]
    return {
        "before": record["before"], "after": record["after"], "tokens": record["tokens"], "steps": record["steps"],
        "kl_first_steps": [s["kl"] for s in steps[:3]], "kl_last_steps": [s["kl"] for s in steps[-3:]],
        "tokens_per_s": steps[-1]["tokens_per_s"],
        # The cosine schedule must span the whole run on any number of processes.
        "lr_at_half": steps[len(steps) // 2]["lr"], "lr_last": steps[-1]["lr"],
        "peak_gib_process0": round(log[-1]["peak_memory_bytes"] / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--processes", type=int, default=torch.cuda.device_count())
    parser.add_argument("--modes", default="single,ddp,fsdp2")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--tokens", default="2M")
    parser.add_argument("--seq-len", default="512")
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-distributed"))
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsify.upcycle import upcycle

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    config = AutoConfig.for_model("llama", vocab_size=49152, tie_word_embeddings=True, **SHAPES[args.shape])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(args.work / "dense")
    for file in Path(args.tokenizer).iterdir():
        shutil.copy(file, args.work / "dense" / file.name)
    upcycle(str(args.work / "dense"), "fine-moe", args.work / "fmoe", granularity=4, top_k=2)
    flags = ["--data", args.data, "--eval-data", args.eval_data, "--tokens", args.tokens, "--seq-len", args.seq_len,
             "--batch-size", args.batch_size, "--eval-every", "0", "--eval-tokens", "64k", "--checkpoint-every", "50"]
    report = {"benchmark": "train_distributed", "shape": args.shape, "gpus": torch.cuda.device_count(),
              "processes": args.processes, "flags": flags, "runs": {}}
    for mode in args.modes.split(","):
        out = args.work / mode
        command = [*_launch(mode, args.processes), "-m", "sparsify", "train", str(args.work / "fmoe"), "-o", str(out), *flags]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        entry = {"returncode": done.returncode, "seconds": round(time.perf_counter() - started, 1)}
        entry.update(_summary(out) if done.returncode == 0 else {"stderr_tail": done.stderr[-3000:]})
        report["runs"][mode] = entry
        print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    main()
