"""Training across processes on the CPU: DDP through `accelerate launch`, FSDP2 sharded state.

accelerate enables FSDP only on accelerators, so the whole FSDP run is checked on the GPU machine
(bench/train_ddp.py --fsdp); here the part of it that is ours — gathering sharded adapters,
routers and optimizer state into a checkpoint and scattering it back — runs under real FSDP2
sharding with the gloo backend.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import sparsify_command

def _two_processes() -> list[str]:
    """`sparsify train` in two CPU processes (gloo), launched by torchrun: `accelerate launch --cpu` starts
    a single process whatever --num_processes says (its multi-CPU path needs mpirun)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "-m", "sparsify"]


def _two_process_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def _flags(corpus) -> list[str]:
    # 9 held-out blocks over 2 processes at batch 4: one process evaluates 2 batches, the other 1,
    # so the uncounted extra forward pass is exercised.
    return [
        "--data", str(corpus["train"]), "--eval-data", str(corpus["valid"]), "--tokens", "1024", "--seq-len", "32",
        "--batch-size", "4", "--eval-every", "0", "--eval-tokens", "288", "--lr", "3e-3", "--router-lr", "3e-2",
        "--lora-rank", "4", "--lora-alpha", "8",
    ]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_ddp_on_cpu_evaluates_like_one_process_and_saves_a_native_model(students, corpus, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ddp = subprocess.run(
        [*_two_processes(), "train", str(students["half"]), "-o", str(tmp_path / "ddp"), *_flags(corpus)],
        capture_output=True, text=True, env=_two_process_env(), timeout=900,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [*sparsify_command(), "train", str(students["half"]), "-o", str(tmp_path / "single"), *_flags(corpus)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_log, single_log = _log(tmp_path / "ddp.run"), _log(tmp_path / "single.run")
    # The held-out blocks are divided among the processes and the sums added: the same numbers.
    for key in ("student_ppl", "teacher_ppl", "kl", "top1_agreement", "tokens"):
        assert ddp_log[0]["eval"][key] == pytest.approx(single_log[0]["eval"][key], rel=1e-5), key
    assert ddp_log[0]["eval"]["tokens"] == 288
    # Two processes take twice the tokens per step; the schedule runs once, not once per process.
    assert ddp_log[1]["tokens"] == 2 * single_log[1]["tokens"] == 256
    assert ddp_log[-2]["step"] == 4 and ddp_log[-2]["total_steps"] == 4 and ddp_log[-2]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert ddp.stdout.count("held-out perplexity") <= 1  # only the main process reports
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]



def test_ddp_counts_every_process_load_before_moving_the_selection_biases(dense_models, corpus, tmp_path):
    """Two processes at batch 4 see, step for step, the same blocks as one process at batch 8
    (sparsify.data.block_order); with the loads summed across processes, the biases after the step agree."""
    from safetensors import safe_open

    from sparsify.upcycle import upcycle

    student = upcycle(str(dense_models["llama"]), "fine-moe", tmp_path / "sigmoid", granularity=4, top_k=1, shared_experts=1,
                      routing="sigmoid").output
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    flags = [*_flags(corpus), "--tokens", "256", "--bias-rate", "0.01"]
    ddp = subprocess.run([*_two_processes(), "train", str(student), "-o", str(tmp_path / "ddp"), *flags],
                         capture_output=True, text=True, env=_two_process_env(), timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([*sparsify_command(), "train", str(student), "-o", str(tmp_path / "single"), *flags, "--batch-size", "8"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]

    def biases(folder: Path) -> torch.Tensor:
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            return torch.stack([weights.get_tensor(f"model.layers.{layer}.mlp.gate.e_score_correction_bias") for layer in range(2)])

    # The loads behind the step are both processes' together: those of one process at batch 8.
    load = [[e["load_max_over_mean"] for e in _log(tmp_path / f"{run}.run") if "kl" in e] for run in ("ddp", "single")]
    assert len(load[0]) == 1 and load[0] == load[1]
    assert biases(tmp_path / "ddp").abs().min() == pytest.approx(0.01)  # one step moved every bias
    torch.testing.assert_close(biases(tmp_path / "ddp"), biases(tmp_path / "single"), rtol=0, atol=0)

FSDP_ROUND_TRIP = r"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sparsify.train.loop import load_student
from sparsify.train.options import TrainOptions
from sparsify.train.state import gather_optimizer, gather_trainable, load_checkpoint, save_checkpoint

folder, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
options = TrainOptions.of(lora_rank=4, lora_alpha=8.0)


def sharded_student():
    # Frozen weights in bf16 next to fp32 adapters and routers, as in a bf16 run on the GPU.
    model, _ = load_student(folder, options, torch.bfloat16)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def step(model, optimizer, scheduler, seed):
    generator = torch.Generator().manual_seed(seed + rank)
    ids = torch.randint(0, 4000, (2, 16), generator=generator)
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


names = {n for n, p in load_student(folder, options, torch.float32)[0].named_parameters() if p.requires_grad}
torch.manual_seed(0)
first = sharded_student()
for seed in (1, 2):
    step(*first, seed)
trainable, optimizer_state = gather_trainable(first[0], names), gather_optimizer(first[0], first[1])
if rank == 0:
    assert set(trainable) == names and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in trainable.values())
    save_checkpoint(run_dir, 2, trainable, optimizer_state, first[2], {"options": {}, "processes": 2})
dist.barrier()

second = sharded_student()
load_checkpoint(run_dir / "checkpoint", second[0], second[1], second[2], names)
restored = gather_trainable(second[0], names)
if rank == 0:
    assert all(torch.equal(restored[k], trainable[k]) for k in names)
# One more step on both: equal only if the optimizer moments and the schedule were restored too.
step(*first, 3)
step(*second, 3)
after_first, after_second = gather_trainable(first[0], names), gather_trainable(second[0], names)
if rank == 0:
    assert all(torch.equal(after_first[k], after_second[k]) for k in names)
    assert any(not torch.equal(after_first[k], trainable[k]) for k in names)
    print("round trip ok", len(names))
dist.destroy_process_group()
"""


def test_fsdp2_sharded_state_round_trips_through_a_checkpoint(students, tmp_path):
    script = tmp_path / "round_trip.py"
    script.write_text(FSDP_ROUND_TRIP)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script),
         str(students["half"]), str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "round trip ok" in done.stdout
