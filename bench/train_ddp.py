"""Multi-GPU check (run on a machine with 2+ GPUs): the same tiny router training on 1 process and
under `accelerate launch` DDP on N processes. Prints JSON with both runs' held-out results.

    python bench/train_ddp.py --tokenizer TOKENIZER_DIR --data train.jsonl.gz --eval-data valid.jsonl.gz
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--processes", type=int, default=torch.cuda.device_count())
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-ddp"))
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsify.upcycle import upcycle

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(args.work / "dense")
    for file in Path(args.tokenizer).iterdir():
        shutil.copy(file, args.work / "dense" / file.name)
    upcycle(str(args.work / "dense"), "fine-moe", args.work / "fmoe", granularity=4, top_k=2)
    flags = ["--data", args.data, "--eval-data", args.eval_data, "--tokens", "2M", "--seq-len", "512", "--batch-size", "8",
             "--eval-every", "0", "--eval-tokens", "64k", "--checkpoint-every", "50"]
    report = {"benchmark": "train_ddp", "gpus": torch.cuda.device_count(), "runs": {}}
    commands = {
        "single": [sys.executable, "-m", "sparsify", "train", str(args.work / "fmoe"), "-o", str(args.work / "single"), *flags],
        f"ddp{args.processes}": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.processes),
                                 "-m", "sparsify", "train", str(args.work / "fmoe"), "-o", str(args.work / "ddp"), *flags],
    }
    for name, command in commands.items():
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        entry = {"returncode": done.returncode, "seconds": round(time.perf_counter() - started, 1)}
        if done.returncode:
            entry["stderr_tail"] = done.stderr[-2000:]
        else:
            out = args.work / ("single" if name == "single" else "ddp")
            record = json.loads((out / "sparsify.json").read_text())["training"][-1]
            entry.update({"before": record["before"], "after": record["after"], "tokens": record["tokens"], "steps": record["steps"]})
            log = [json.loads(l) for l in (args.work / f"{out.name}.run" / "log.jsonl").read_text().splitlines()]
            steps = [e for e in log if "tokens_per_s" in e]
            entry["tokens_per_s_last"] = steps[-1]["tokens_per_s"]
            # The cosine schedule must span the whole run on any number of processes.
            entry["lr_at_half"] = steps[len(steps) // 2]["lr"]
            entry["lr_last"] = steps[-1]["lr"]
        report["runs"][name] = entry
        print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    main()
