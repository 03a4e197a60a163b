"""The router-training loop: student = converted MoE with LoRA, teacher = the dense model.

Read top to bottom: set up (model, teacher, data, optimizer), evaluate, train with periodic
evaluation and checkpoints, evaluate, merge LoRA and save the model in its native format.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sparsify.atomic_output import check_output_free
from sparsify.data import DataSpec, TokenFile, block_order, materialise
from sparsify.errors import SparsifyError
from sparsify.model_folder import save_model_folder
from sparsify.provenance import read_record
from sparsify.train import losses
from sparsify.train.lora import LoraSettings, add_adapters, load_trainable_state, merge_adapters
from sparsify.option_values import dtype_name
from sparsify.train.options import TrainOptions
from sparsify.train.routing import dense_path, prepare_routers
from sparsify.train.skipping import find_gates, gates_open, recording, sparsity_loss
from sparsify.train.state import (
    CHECKPOINT, LOG, StepLog, check_same_run, find_checkpoint, gather_optimizer, gather_trainable, load_checkpoint, save_checkpoint,
)

# Options that may change between a run and its resumption without changing its loss curve.
RESUMABLE_CHANGES = {"eval_every", "checkpoint_every", "eval_tokens"}


class TrainingDiverged(SparsifyError):
    pass


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, with a message saying whether a checkpoint exists and how to resume. Still a
    KeyboardInterrupt, so code that catches SparsifyError (say, to try the next setting) stops."""


@dataclass
class TrainResult:
    output: Path
    run_dir: Path
    steps: int  # of the whole run
    tokens: int  # of the whole run
    seconds: float  # this session's training time (a resumed run counts from where it resumed)
    tokens_per_second: float  # this session's
    peak_memory_bytes: int  # as logged in log.jsonl
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0  # > 0: this session resumed the run after that step

    @property
    def session_tokens(self) -> int:
        return self.tokens * (self.steps - self.start_step) // self.steps if self.steps else 0


# Router training of SmolLM2-135M fine-moe on a 2-core CPU: ~2-10 tokens/s (measured by a user on a
# busy machine, issue "Everything the CLI tells a user must be true"); a tiny 3M-parameter student
# ran at 107 tokens/s here, which the linear scaling below puts at 2.4 tokens/s for 135M. On one
# H100: 28-45k tokens/s (docs/results.md). Used to warn before a CPU run that would take hours.
CPU_TOKENS_PER_S_135M = (2, 10)
GPU_RATE_NOTE = "30-45k tokens/s on one H100"


def default_run_dir(output: Path) -> Path:
    return output.parent / f"{output.name}.run"


def train(model_dir: str | Path, options: TrainOptions, **kwargs: Any) -> TrainResult:
    """Run (or resume) a training run; see `_train` for the keyword arguments.

    A run that fails or is interrupted before its first checkpoint leaves no run folder behind
    (unless the folder was there before); one with a checkpoint keeps it for `--resume`."""
    output = Path(kwargs.get("output") or model_dir)
    run_dir = Path(kwargs.get("run_dir") or default_run_dir(output))
    existed = run_dir.exists()
    try:
        return _train(model_dir, options, **kwargs)
    except torch.cuda.OutOfMemoryError as error:
        _discard_unstarted_run(run_dir, existed)
        # Anywhere: the evaluation before training runs first and uses the same batch size.
        raise SparsifyError(
            f"out of GPU memory with --batch-size {options.batch_size} x --seq-len {options.seq_len}; lower "
            "--batch-size (raise --grad-accum to keep the tokens per step) or --seq-len"
        ) from error
    except KeyboardInterrupt:
        checkpoint = _discard_unstarted_run(run_dir, existed)
        resume = f"sparsify train {model_dir}" + (f" -o {output}" if output != Path(model_dir) else "") + " --resume"
        if checkpoint:
            kept = f"the last checkpoint is in {run_dir}; continue with `{resume}` and the same training flags"
        elif options.checkpoint_every:
            kept = f"no checkpoint had been written yet (the first comes at step {options.checkpoint_every}), so there is nothing to resume"
        else:
            kept = "--checkpoint-every 0 writes no checkpoints, so there is nothing to resume"
        raise TrainingInterrupted(f"training interrupted; {kept}") from None
    except TrainingDiverged:
        raise  # its log is the evidence of what went wrong: kept, whatever else the folder holds
    except BaseException:
        _discard_unstarted_run(run_dir, existed)
        raise


def _discard_unstarted_run(run_dir: Path, existed: bool) -> Path | None:
    """Remove a run folder this call created if it holds no checkpoint; returns the checkpoint.
    Only the main process removes anything: under `accelerate launch` another rank may fail first
    while rank 0 is still writing."""
    checkpoint = find_checkpoint(run_dir) if run_dir.exists() else None
    main_process = os.environ.get("RANK", "0") == "0"
    if not existed and checkpoint is None and main_process:
        shutil.rmtree(run_dir, ignore_errors=True)
    return checkpoint


def _train(
    model_dir: str | Path,
    options: TrainOptions,
    *,
    output: str | Path | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    restart: bool = False,
    command: str | None = None,
    on_step: Callable[[dict[str, Any]], None] = lambda entry: None,
    on_status: Callable[[str], None] = lambda text: None,
    on_plan: Callable[[int, int], None] = lambda total_steps, start_step: None,
    on_notice: Callable[[str], None] = lambda text: None,
) -> TrainResult:
    """`on_status(text)`: the phase; `on_plan(total_steps, start_step)`: as soon as both are known;
    `on_notice(text)`: a one-off message for the user (e.g. that a CPU run will be slow);
    `on_step(entry)`: after every optimizer step; `command`: recorded in sparsify.json."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    options.validate()
    model_dir = Path(model_dir)
    check_trainable(model_dir, options)
    output = Path(output) if output else model_dir
    run_dir = Path(run_dir) if run_dir else default_run_dir(output)
    if output != model_dir:
        check_output_free(output, overwrite=False)
    checkpoint = find_checkpoint(run_dir) if run_dir.exists() else None
    if checkpoint and not (resume or restart):
        raise SparsifyError(f"{run_dir} holds an unfinished run; pass --resume to continue it or --restart to start over")
    if resume and not checkpoint:
        raise SparsifyError(f"nothing to resume: no checkpoint in {run_dir}")
    if restart:
        checkpoint = None

    # --- setup -----------------------------------------------------------------------------
    precision = dtype_name(options.precision, "--precision", ("float32", "bfloat16"))
    use_bf16 = precision == "bfloat16" or (precision == "auto" and torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no")
    _check_fsdp_version(accelerator)
    torch.manual_seed(options.train_seed)
    record = read_record(model_dir) or {}
    world = accelerator.num_processes
    tokens_per_step = options.batch_size * options.seq_len * options.grad_accum * world
    total_steps = max(1, math.ceil(options.train_tokens / tokens_per_step))
    start_step = _checkpoint_step(checkpoint)
    on_plan(total_steps, start_step)
    notice = cpu_notice(model_dir, (total_steps - start_step) * tokens_per_step) if accelerator.device.type == "cpu" else None
    if notice:
        on_notice(notice)
    on_status("loading model")
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    model, routers, gates = _student(model_dir, options, dtype)
    top_k = int(routers[0].top_k) if routers else 0  # no routers: a dense LoRA baseline or a skip model
    teacher = _teacher(options, record, routers, gates, use_bf16)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = DataSpec(options.sources(options.data), options.sources(options.eval_data), options.text_field)
    on_status("tokenizing data (once per run folder)")
    with accelerator.main_process_first():
        paths = materialise(spec, tokenizer, run_dir / "data", options.train_tokens, options.heldout_tokens)
    train_data, heldout = TokenFile(paths["train"], options.seq_len), TokenFile(paths["heldout"], options.seq_len)

    # Routers and skip gates (the decisions) train in full at --router-lr; adapters at --lr.
    decision_params = [p for module in [*routers, *gates] for p in module.parameters()]
    decision_ids = {id(p) for p in decision_params}
    adapter_params = [p for p in model.parameters() if p.requires_grad and id(p) not in decision_ids]
    groups = [{"params": decision_params, "lr": options.router_lr}] if decision_params else []
    if adapter_params:
        groups.append({"params": adapter_params, "lr": options.lr})
    if not groups:
        raise SparsifyError("nothing to train: this model has no routers or gates and --lora-rank is 0")
    optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(options.warmup * total_steps), total_steps)
    # The scheduler stays out of accelerator.prepare: accelerate's wrapper steps it once per
    # process, which would run the schedule num_processes times too fast under DDP.
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    start_step = 0
    options_dict = asdict(options)
    trainable_names = {name for name, param in unwrapped.named_parameters() if param.requires_grad}
    if checkpoint:
        meta = load_checkpoint(checkpoint, model, optimizer, scheduler, trainable_names)
        check_same_run(meta["options"], options_dict, RESUMABLE_CHANGES)
        if meta.get("processes", 1) != world:  # the data order and the tokens per step depend on it
            raise SparsifyError(f"cannot resume: the run used {meta.get('processes', 1)} processes, this launch has {world}")
        start_step = meta["step"]
        on_status(f"resumed at step {start_step}")
    log = StepLog(run_dir / LOG, keep_through_step=start_step if checkpoint else None) if accelerator.is_main_process else None

    # --- train -----------------------------------------------------------------------------
    def evaluate() -> dict[str, float]:
        return _evaluate(model, teacher, heldout, options, accelerator, gates)

    blocks = min(heldout.num_blocks, max(1, options.heldout_tokens // options.seq_len))
    if start_step == 0:
        on_status(f"held-out evaluation before training ({blocks * options.seq_len:,} tokens, student and teacher)")
    before = evaluate() if start_step == 0 else _first_eval(run_dir / LOG)
    if log and start_step == 0:
        log.write({"step": 0, "eval": before})
    on_status("training")
    model.train()
    started, tokens_done = time.perf_counter(), 0
    history: list[dict[str, Any]] = []
    for step in range(start_step + 1, total_steps + 1):
        parts_sum: dict[str, float] = {}
        for micro in range(options.grad_accum):
            index = ((step - 1) * options.grad_accum + micro) * world + accelerator.process_index
            order = block_order(train_data.num_blocks, options.train_seed, index * options.batch_size, options.batch_size)
            ids = train_data.blocks(order).to(accelerator.device)
            parts = _losses(model, teacher, ids, options, top_k, gates)
            if not torch.isfinite(parts["total"]):
                last = find_checkpoint(run_dir)
                kept = f"the last good checkpoint is {last} (resume with --resume)" if last else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"the loss became {parts['total'].item()} at step {step}; training stopped and {kept}. "
                    "Try a lower --lr/--router-lr"
                )
            accelerator.backward(parts["total"] / options.grad_accum)
            for name, value in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + value.item() / options.grad_accum
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm) if options.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_done += tokens_per_step
        elapsed = time.perf_counter() - started
        entry = {
            "step": step,
            "tokens": step * tokens_per_step,
            **{name: round(value, 6) for name, value in parts_sum.items()},
            "lr": scheduler.get_last_lr()[-1],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": round(tokens_done / elapsed, 1),
            "elapsed_s": round(elapsed, 3),
            "total_steps": total_steps,
        }
        if options.eval_every and step % options.eval_every == 0 and step != total_steps:
            on_status(f"held-out evaluation at step {step}")
            entry["eval"] = evaluate()
            on_status("training")
            model.train()
        if log:
            log.write(entry)
        history.append(entry)
        on_step(entry)
        if options.checkpoint_every and step % options.checkpoint_every == 0 and step != total_steps:
            trainable, optimizer_state = gather_trainable(model, trainable_names), gather_optimizer(model, optimizer)
            if accelerator.is_main_process:
                save_checkpoint(run_dir, step, trainable, optimizer_state, scheduler, {"options": options_dict, "processes": world})
            accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    on_status("held-out evaluation after training")
    after = evaluate()
    peak_memory = _peak_memory()  # before the merge below, which rebuilds the model: the training peak
    if log:
        log.write({"step": total_steps, "eval": after, "final": True, "peak_memory_bytes": peak_memory})
        log.close()

    # --- save ------------------------------------------------------------------------------
    trainable = gather_trainable(model, trainable_names)
    if accelerator.is_main_process:
        on_status("merging adapters and saving")
        del model, optimizer  # the merge rebuilds the model whole, on the CPU, from the trained state
        merged = _merged(model_dir, options, dtype, trainable)
        _save(merged, tokenizer, model_dir, output, record, options_dict, before, after, total_steps, total_steps * tokens_per_step, command)
        shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)  # the run is finished; log and data stay
    accelerator.wait_for_everyone()
    return TrainResult(
        output, run_dir, total_steps, total_steps * tokens_per_step, seconds,
        tokens_done / seconds if seconds else 0.0, peak_memory, before, after, history, start_step,
    )


def check_trainable(model_dir: Path, options: TrainOptions) -> None:
    """Refuse, before loading anything, a folder `sparsify train` cannot train as asked."""
    from sparsify.checkpoint_reader import check_weight_files
    from sparsify.families import FAMILIES
    from sparsify.skip import SkipConfig

    if not (model_dir / "config.json").exists():
        raise SparsifyError(f"{model_dir} is not a model folder (no config.json); sparsify train takes a folder made by `sparsify upcycle`")
    check_weight_files(model_dir)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    sparse = model_type == SkipConfig.model_type or any(f.moe_model_type == model_type for f in FAMILIES)
    if not sparse and options.teacher == "self":
        raise SparsifyError(
            f"{model_dir} is a dense model ({model_type}): it has no routers or gates, and as its own teacher LoRA would learn "
            f"nothing. Convert it first (`sparsify upcycle {model_dir} --to fine-moe -o OUT`, then `sparsify train OUT`), or "
            "pass --teacher MODEL to fine-tune it with LoRA against another model"
        )


def _checkpoint_step(checkpoint: Path | None) -> int:
    return json.loads((checkpoint / "state.json").read_text())["step"] if checkpoint else 0


def cpu_notice(model_dir: Path, tokens: int) -> str | None:
    """What to expect from a CPU run, from measured rates scaled by the model's size; None when
    the run is short enough not to need a warning."""
    from sparsify.info import count_params

    config = json.loads((model_dir / "config.json").read_text())
    try:
        active = count_params(model_dir, config)["active"]
    except SparsifyError:  # a layout info cannot read: no estimate, but no reason to refuse the run
        return None
    scale = 135e6 / max(active, 1)
    slow, fast = (rate * scale for rate in CPU_TOKENS_PER_S_135M)
    if tokens / slow < 600:
        return None
    return (
        f"no GPU: training runs on the CPU, at roughly {slow:,.0f}-{fast:,.0f} tokens/s for this model "
        f"({active / 1e6:,.0f}M active parameters; measured 2-10 tokens/s for a 135M model on 2 cores), so {tokens:,} "
        f"tokens would take about {_duration(tokens / fast)} to {_duration(tokens / slow)}, plus the held-out evaluations. "
        f"A GPU does {GPU_RATE_NOTE} for a 135M model; on the CPU, try a few thousand --tokens first."
    )


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} seconds"


def _check_fsdp_version(accelerator) -> None:
    if accelerator.distributed_type.name == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise SparsifyError(
            "sparsify train needs FSDP2: FSDP1 flattens parameters and cannot mix the frozen bf16 weights with the "
            "trainable fp32 adapters and routers. Launch with: accelerate launch --use_fsdp --fsdp_version 2 -m sparsify train ..."
        )


def _student(model_dir: Path, options: TrainOptions, dtype: torch.dtype, for_training: bool = True):
    """The converted model with fp32 routers/gates and LoRA adapters: (model, routers, gates)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if for_training:
        model.config.use_cache = False
    routers, gates = prepare_routers(model), find_gates(model)
    lora = LoraSettings(options.lora_rank, options.lora_alpha, options.sources(options.lora_targets))
    return add_adapters(model, lora, routers, gates), routers, gates


def _merged(model_dir: Path, options: TrainOptions, dtype: torch.dtype, trainable: dict[str, torch.Tensor]):
    """A fresh, whole copy of the student with the trained state loaded and LoRA folded in. Rebuilding
    it (instead of merging the training copy in place) is the same code for one process, DDP and FSDP."""
    student, routers, _ = _student(model_dir, options, dtype, for_training=False)
    load_trainable_state(student, trainable)
    merged = merge_adapters(student)
    for router in routers:
        router.weight.data = router.weight.data.to(dtype)
    return merged


def _teacher(options: TrainOptions, record: dict[str, Any], routers, gates, use_bf16: bool) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """(student, ids) -> teacher logits. "self": adapters off + dense path (routers onto copy 0, skip
    gates open), from the student's own weights."""
    if options.teacher == "self":
        layout = record.get("layout") or {}
        if (routers or gates) and not layout.get("dense_path"):
            raise SparsifyError(
                "this model's weights no longer contain its dense teacher (it was trained before, or not made by "
                "sparsify upcycle); pass --teacher with the original dense model"
            )

        def self_teacher(model, ids):
            # Switch the inner peft model's adapters off, but run the forward through the
            # (possibly distributed) wrapper, as the student's own forward does.
            inner = model.module if hasattr(model, "module") else model
            adapters_off = inner.disable_adapter() if hasattr(inner, "disable_adapter") else nullcontext()
            with torch.no_grad(), adapters_off, (dense_path(routers, layout) if routers else nullcontext()), gates_open(gates):
                return model(input_ids=ids).logits

        return self_teacher
    from sparsify.sources import load_model

    separate = load_model(options.teacher, dtype=torch.bfloat16 if use_bf16 else torch.float32)
    separate.requires_grad_(False)

    def separate_teacher(model, ids):
        if next(separate.parameters()).device != ids.device:
            separate.to(ids.device)
        with torch.no_grad():
            return separate(ids).logits

    return separate_teacher


def _losses(model, teacher, ids: torch.Tensor, options: TrainOptions, top_k: int, gates) -> dict[str, torch.Tensor]:
    teacher_logits = teacher(model, ids)
    with recording(gates) as seen:
        out = model(input_ids=ids, output_router_logits=True) if top_k else model(input_ids=ids)
    routed = bool(top_k)
    zero = out.logits.new_zeros((), dtype=torch.float32)
    parts = {
        "kl": losses.kl_to_teacher(out.logits, teacher_logits, options.temperature),
        "ce": _ce(out.logits, ids, track_grad=options.ce_weight > 0),
        "balance": losses.load_balancing_loss(out.router_logits, top_k) if routed else zero,
        "z": losses.router_z_loss(out.router_logits) if routed else zero,
    }
    skip, skip_rate = sparsity_loss(seen, options.target_skip) if gates else (zero, None)
    parts["total"] = (
        options.kl_weight * parts["kl"] + options.ce_weight * parts["ce"]
        + options.balance_weight * parts["balance"] + options.z_weight * parts["z"] + options.skip_weight * skip
    )
    if gates:
        parts["skip"], parts["skip_rate"] = skip, skip_rate
    return parts


def _ce(logits: torch.Tensor, ids: torch.Tensor, track_grad: bool) -> torch.Tensor:
    """Cross-entropy; without a weight it is only reported, so it keeps no graph (and no memory)."""
    with torch.set_grad_enabled(track_grad and torch.is_grad_enabled()):
        return losses.next_token_loss(logits, ids)


def _evaluate(model, teacher, heldout: TokenFile, options: TrainOptions, accelerator, gates=()) -> dict[str, float]:
    """Held-out perplexities, KL and top-1 agreement. The blocks are divided among the processes and
    the sums added up; a process with one batch fewer runs an uncounted one, because under FSDP
    every process must take part in every forward pass."""
    model.eval()
    blocks = min(heldout.num_blocks, max(1, options.heldout_tokens // options.seq_len))
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, blocks, world))
    batches = [mine[i:i + options.batch_size] for i in range(0, len(mine), options.batch_size)]
    rounds = math.ceil(math.ceil(blocks / world) / options.batch_size)
    sums = torch.zeros(6, dtype=torch.float64, device=accelerator.device)  # nll, teacher nll, kl, top-1, blocks, skip rate
    with torch.no_grad():
        for round_index in range(rounds):
            counted = round_index < len(batches)
            ids = heldout.blocks(torch.tensor(batches[round_index] if counted else [0])).to(accelerator.device)
            teacher_logits = teacher(model, ids)
            with accelerator.autocast(), recording(gates) as seen:
                student_logits = model(input_ids=ids).logits
            if counted:
                n = ids.shape[0]
                skip_rate = 1.0 - torch.cat([keep.reshape(-1) for _, keep in seen]).float().mean() if gates else student_logits.new_zeros(())
                sums += n * torch.stack([
                    losses.next_token_loss(student_logits, ids), losses.next_token_loss(teacher_logits, ids),
                    losses.kl_to_teacher(student_logits, teacher_logits), losses.top1_agreement(student_logits, teacher_logits),
                    torch.tensor(1.0, device=sums.device), skip_rate.to(sums.device).float(),
                ]).to(sums)
    sums = accelerator.reduce(sums, "sum")
    student_nll, teacher_nll, kl, top1, count, skip_rate = (sums / sums[4]).tolist()[:4] + [sums[4].item(), (sums[5] / sums[4]).item()]
    result = {
        "student_ppl": math.exp(student_nll),
        "teacher_ppl": math.exp(teacher_nll),
        "kl": kl,
        "top1_agreement": top1,
        "tokens": int(count) * options.seq_len,
    }
    if gates:
        result["skip_rate"] = skip_rate
    return result


def _first_eval(log_path: Path) -> dict[str, float]:
    for line in log_path.read_text().splitlines():
        entry = json.loads(line)
        if entry["step"] == 0 and "eval" in entry:
            return entry["eval"]
    return {}


def _peak_memory() -> int:
    """High-water mark of this process: GPU allocations, or resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def _save(model, tokenizer, model_dir: Path, output: Path, record: dict[str, Any], options: dict[str, Any],
          before: dict[str, float], after: dict[str, float], steps: int, tokens: int, command: str | None) -> None:
    record = dict(record)
    if record.get("layout"):
        # Merged adapters changed copy 0 and the attention: the dense path is no longer the teacher.
        record["layout"] = {**record["layout"], "dense_path": None}
    record["training"] = [*record.get("training", []), {"steps": steps, "tokens": tokens, "options": options, "before": before, "after": after, "command": command}]
    save_model_folder(model, tokenizer, model_dir, output, record, overwrite=output == model_dir)
