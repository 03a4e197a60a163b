"""Streaming conversion benchmark: peak memory and throughput of `upcycle` on a ~1.5B Llama.

Builds a synthetic bf16 Llama checkpoint (hidden 2048, d_ff 8192, 22 layers, GQA 16/8 heads,
vocab 32000, untied: ~1.51B parameters, ~3.0 GB) on disk, converts it to fine-moe G=8 E=2 in a
child process (alternating with copies, --repeats times), and compares its output bytes/s with a plain copy of the same number of bytes on
the same disk, measured in the same run. Prints one JSON object.

    python bench/convert_memory.py [--workdir DIR] [--layers 22] [--keep]

Targets (issue #2): peak RSS under 25% of the source size; throughput at least 0.8x the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsify.checkpoint_writer import PlannedTensor, write_checkpoint

SHAPE = dict(hidden=2048, d_ff=8192, heads=16, kv_heads=8, head_dim=128, vocab=32000)

# Peak RSS is read from VmHWM inside the child: getrusage's ru_maxrss carries the parent's
# pre-exec size over into a spawned child on Linux, which would hide the converter's own peak.
PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
CONVERT = f"""
import sys, time, json
started = time.perf_counter()
from sparsify.upcycle import upcycle
imported = time.perf_counter()
result = upcycle(sys.argv[1], "fine-moe", sys.argv[2], granularity=8, experts=2, max_shard_bytes=int(2e9))
done = time.perf_counter()
print(json.dumps({{"seconds": done - imported, "with_imports": done - started, "peak_rss": {PEAK_RSS}}}))
"""
BASELINE = f"import sparsify.upcycle, torch, transformers; print({PEAK_RSS})"


def synthetic_llama(folder: Path, layers: int) -> int:
    h, f, v = SHAPE["hidden"], SHAPE["d_ff"], SHAPE["vocab"]
    kv = SHAPE["kv_heads"] * SHAPE["head_dim"]
    per_layer = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(layers):
        shapes.update({f"model.layers.{layer}.{k}": s for k, s in per_layer.items()})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    generator = torch.Generator().manual_seed(0)

    def produce(shape):
        return lambda: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    planned = [PlannedTensor(n, s, torch.bfloat16, produce(s)) for n, s in shapes.items()]
    write_checkpoint(folder, planned, max_shard_bytes=int(2e9))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": SHAPE["heads"], "num_key_value_heads": SHAPE["kv_heads"],
        "head_dim": SHAPE["head_dim"], "vocab_size": v, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return sum(t.nbytes for t in planned)


def timed_copy(files: list[Path], dest: Path) -> tuple[int, float]:
    dest.mkdir()
    copied, started = 0, time.perf_counter()
    for file in files:
        target = dest / file.name
        shutil.copyfile(file, target)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())  # the converter fsyncs its shards too
        copied += file.stat().st_size
    return copied, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir under ./)")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--repeats", type=int, default=3, help="alternating convert/copy rounds; medians reported")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir or Path.cwd()))
    try:
        source, output = work / "dense", work / "fmoe"
        source.mkdir()
        source_bytes = synthetic_llama(source, args.layers)
        # This machine's disk speed drifts by several x within minutes, so conversion and copy
        # alternate and the medians are compared.
        runs, copies = [], []
        for _ in range(args.repeats):
            shutil.rmtree(output, ignore_errors=True)
            shutil.rmtree(work / "copy", ignore_errors=True)
            child = subprocess.run([sys.executable, "-c", CONVERT, str(source), str(output)], capture_output=True, text=True)
            if child.returncode != 0:
                raise SystemExit(child.stderr)
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
            output_files = sorted(output.glob("*.safetensors"))
            copies.append(timed_copy(output_files, work / "copy"))
        converted = {key: statistics.median(run[key] for run in runs) for key in ("seconds", "with_imports")}
        peak_rss = max(run["peak_rss"] for run in runs)
        baseline = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True)
        output_bytes = sum(f.stat().st_size for f in output_files)
        copy_bytes = copies[0][0]
        copy_seconds = statistics.median(seconds for _, seconds in copies)
        convert_rate = output_bytes / converted["seconds"]
        copy_rate = copy_bytes / copy_seconds
        print(json.dumps({
            "benchmark": "convert_memory",
            "conversion": "fine-moe granularity=8 experts=2 (16 experts, top-8), bf16",
            "source_params": source_bytes // 2,
            "source_bytes": source_bytes,
            "output_bytes": output_bytes,
            "wall_s": round(converted["seconds"], 2),
            "wall_s_with_python_imports": round(converted["with_imports"], 2),
            "bytes_per_s": round(convert_rate),
            "peak_rss_bytes": peak_rss,
            "peak_rss_fraction_of_source": round(peak_rss / source_bytes, 4),
            "import_only_rss_bytes": int(baseline.stdout.strip()),
            "copy_bytes_per_s": round(copy_rate),
            "repeats": args.repeats,
            "convert_s_each": [round(run["seconds"], 2) for run in runs],
            "copy_s_each": [round(seconds, 2) for _, seconds in copies],
            "throughput_ratio_vs_copy": round(convert_rate / copy_rate, 3),
            "target_rss_under_25pct": peak_rss < 0.25 * source_bytes,
            "target_throughput_at_least_0.8x": convert_rate >= 0.8 * copy_rate,
        }, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
