"""The training loop: student = a converted model with LoRA and its decisions (routers, gates)
trained in full, teacher = the dense model (by default the dense path inside the student's weights).

Read top to bottom, one phase per function: locate the run, set up the accelerator and the
schedule, load the student and the teacher, the data, the optimizer; evaluate, train with periodic
evaluation and checkpoints, evaluate; merge LoRA and save the model in its own format. The loop
names no variant: it asks the model's `Decisions` (sparsify.train.decisions).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sparsify.atomic_output import check_output_free
from sparsify.convert import recognised, variant_of_record
from sparsify.data import DataSpec, TokenFile, block_order, materialise
from sparsify.errors import SparsifyError
from sparsify.experts import use_fast_experts
from sparsify.model_folder import save_model_folder
from sparsify.option_values import dtype_name
from sparsify.provenance import read_record, source_reference
from sparsify.train import losses
from sparsify.train.decisions import Decisions, find_decisions
from sparsify.train.hidden import capture_ffn_outputs, check_matching, hidden_state_loss
from sparsify.train.lora import LoraSettings, add_adapters, load_trainable_state, merge_adapters
from sparsify.train.options import TrainOptions
from sparsify.train.schedule import Phases
from sparsify.train.teacher_cache import CacheKey, TeacherCache, teacher_digest, token_file_digest
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
    peak_memory_kind: str = "resident"  # "GPU": the accelerator's allocations; "resident": the process's RAM

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
            f"out of GPU memory with --batch-size {options.optimisation.batch_size} x --seq-len {options.data.seq_len}; lower "
            "--batch-size (raise --grad-accum to keep the tokens per step) or --seq-len"
        ) from error
    except KeyboardInterrupt:
        checkpoint = _discard_unstarted_run(run_dir, existed)
        resume = f"sparsify train {model_dir}" + (f" -o {output}" if output != Path(model_dir) else "") + " --resume"
        if checkpoint:
            kept = f"the last checkpoint is in {run_dir}; continue with `{resume}` and the same training flags"
        elif options.run.checkpoint_every:
            kept = f"no checkpoint had been written yet (the first comes at step {options.run.checkpoint_every}), so there is nothing to resume"
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


@dataclass
class _Callbacks:
    on_step: Callable[[dict[str, Any]], None] = lambda entry: None
    on_status: Callable[[str], None] = lambda text: None
    on_plan: Callable[[int, int], None] = lambda total_steps, start_step: None
    on_notice: Callable[[str], None] = lambda text: None


@dataclass
class _Teacher:
    """The teacher as the loop uses it: its logits for a batch, and the network whose FFNs compute
    them (for the hidden-state loss): the student itself on its dense path, or a separate model."""

    logits: Callable[[Any, torch.Tensor], torch.Tensor]  # (student, ids) -> teacher logits, no grad
    network: Callable[[Any], torch.nn.Module]  # (student) -> the module run by `logits`
    reference: str = ""  # the weights it computes from (a folder, file or Hub id): what a teacher cache is keyed by

    def __call__(self, model, ids: torch.Tensor) -> torch.Tensor:
        return self.logits(model, ids)


@dataclass
class _Run:
    """What the phases share, filled in as they run."""

    model_dir: Path
    output: Path
    run_dir: Path
    options: TrainOptions
    checkpoint: Path | None
    callbacks: _Callbacks
    command: str | None
    record: dict[str, Any] = field(default_factory=dict)
    accelerator: Any = None
    dtype: torch.dtype = torch.float32
    total_steps: int = 0
    tokens_per_step: int = 0
    model: Any = None
    decisions: Decisions = field(default_factory=Decisions)
    teacher: _Teacher | None = None
    teacher_cache: TeacherCache | None = None
    tokenizer: Any = None
    train_data: TokenFile | None = None
    heldout: TokenFile | None = None
    optimizer: Any = None
    scheduler: Any = None
    trainable_names: set[str] = field(default_factory=set)
    phases: Phases | None = None
    adapter_params: list[torch.nn.Parameter] = field(default_factory=list)  # frozen in the router-first phase
    start_step: int = 0
    log: StepLog | None = None


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
    run = _locate(Path(model_dir), options, output, run_dir, resume, restart, _Callbacks(on_step, on_status, on_plan, on_notice), command)
    _set_up(run)
    _load_models(run)
    _load_data(run)
    _make_optimizer(run)
    _restore(run)
    before = _evaluate_before(run)
    history, seconds, tokens_done = _train_steps(run)
    if run.teacher_cache is not None:
        run.teacher_cache.flush()
    run.callbacks.on_status("held-out evaluation after training")
    after = _evaluate(run)
    peak_memory, memory_kind = _peak_memory()  # before the merge below, which rebuilds the model: the training peak
    if run.log:
        run.log.write({"step": run.total_steps, "eval": after, "final": True, "peak_memory_bytes": peak_memory})
        run.log.close()
    _save(run, before, after)
    return TrainResult(
        run.output, run.run_dir, run.total_steps, run.total_steps * run.tokens_per_step, seconds,
        tokens_done / seconds if seconds else 0.0, peak_memory, before, after, history, run.start_step, memory_kind,
    )


# --- phases ------------------------------------------------------------------------------------


def _locate(model_dir: Path, options: TrainOptions, output, run_dir, resume: bool, restart: bool, callbacks: _Callbacks,
            command: str | None) -> _Run:
    """Check the options and the folders, and find the checkpoint to resume, before anything loads."""
    options.validate()
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
    return _Run(model_dir, output, run_dir, options, None if restart else checkpoint, callbacks, command)


def _set_up(run: _Run) -> None:
    """The accelerator, the precision and the step schedule; warn when the CPU would take hours."""
    from accelerate import Accelerator

    options = run.options
    precision = dtype_name(options.optimisation.precision, "--precision", ("float32", "bfloat16"))
    use_bf16 = precision == "bfloat16" or (precision == "auto" and torch.cuda.is_available())
    run.accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no")
    _check_fsdp_version(run.accelerator)
    torch.manual_seed(options.optimisation.train_seed)
    run.dtype = torch.bfloat16 if use_bf16 else torch.float32
    run.record = read_record(run.model_dir) or {}
    variant = variant_of_record(run.record)
    run.options = options = options.with_learning_rates(variant.learning_rates if variant is not None else None)
    run.tokens_per_step = options.tokens_per_step_per_process * run.accelerator.num_processes
    run.total_steps = max(1, math.ceil(options.data.train_tokens / run.tokens_per_step))
    start_step = _checkpoint_step(run.checkpoint)
    run.callbacks.on_plan(run.total_steps, start_step)
    if run.accelerator.device.type == "cpu":
        notice = cpu_notice(run.model_dir, (run.total_steps - start_step) * run.tokens_per_step)
        if notice:
            run.callbacks.on_notice(notice)


def _load_models(run: _Run) -> None:
    run.callbacks.on_status("loading model")
    run.model, run.decisions = load_student(run.model_dir, run.options, run.dtype, run.record)
    run.teacher = _teacher(run.options, run.record, run.decisions, run.dtype, run.model_dir)
    if run.options.distillation.hidden_weight > 0:
        check_matching(run.model, run.teacher.network(run.model))


def _load_data(run: _Run) -> None:
    from transformers import AutoTokenizer

    data = run.options.data
    run.tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    spec = DataSpec(data.train_sources, data.heldout_sources, data.text_field)
    run.callbacks.on_status("tokenizing data (once per run folder)")
    with run.accelerator.main_process_first():
        paths = materialise(spec, run.tokenizer, run.run_dir / "data", data.train_tokens, data.heldout_tokens)
    run.train_data, run.heldout = TokenFile(paths["train"], data.seq_len), TokenFile(paths["heldout"], data.seq_len)
    distillation = run.options.distillation
    if distillation.cache_teacher:
        run.callbacks.on_status("opening the teacher cache")
        vocab = run.model.get_output_embeddings().weight.shape[0]  # the logits' width, what the stored ids index
        key = CacheKey(teacher_digest(run.teacher.reference), token_file_digest(paths["train"]), data.seq_len, distillation.cache_top_k,
                       distillation.temperature, vocab)
        with run.accelerator.main_process_first():
            run.teacher_cache = TeacherCache.open(distillation.cache_teacher, key, run.train_data.num_blocks,
                                                  create=run.accelerator.is_main_process)


def _make_optimizer(run: _Run) -> None:
    """AdamW over the decisions (in full, at --router-lr), the adapters (at --lr) and, with --train-experts
    full, the expert weights (at --expert-lr); each group has a warm-up and cosine schedule, the adapters'
    and experts' starting after the router-first steps (schedule.py)."""
    optimisation = run.options.optimisation
    decision_params = [p for module in run.decisions.modules for p in module.parameters()]
    expert_params = run.decisions.expert_weights(run.model) if run.options.lora.full_experts else []
    special = {id(p) for p in decision_params + expert_params}
    adapter_params = [p for p in run.model.parameters() if p.requires_grad and id(p) not in special]
    if optimisation.router_first and not decision_params:
        run.callbacks.on_notice("--router-first does nothing here: this model has no routers or gates, so its adapters train from the first step")
    router_first = optimisation.router_first if decision_params and (adapter_params or expert_params) else 0.0
    run.phases = Phases(run.total_steps, optimisation.warmup, router_first)
    groups = [(params, lr, schedule) for params, lr, schedule in (
        (decision_params, optimisation.router_lr, run.phases.decisions()),
        (adapter_params, optimisation.lr, run.phases.adapters()),
        (expert_params, optimisation.expert_lr, run.phases.adapters()),  # frozen with the adapters during --router-first
    ) if params]
    if not groups:
        raise SparsifyError("nothing to train: this model has no routers or gates, --lora-rank is 0 and --train-experts is not full")
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr} for params, lr, _ in groups], weight_decay=optimisation.weight_decay)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule for *_, schedule in groups])
    # The scheduler stays out of accelerator.prepare: accelerate's wrapper steps it once per
    # process, which would run the schedule num_processes times too fast under DDP.
    run.model, run.optimizer = run.accelerator.prepare(run.model, optimizer)
    unwrapped = run.accelerator.unwrap_model(run.model)
    use_fast_experts(unwrapped)  # on the training device: an MoE's experts implementation (sparsify/experts)
    run.trainable_names = {name for name, param in unwrapped.named_parameters() if param.requires_grad}
    # Buffers the decisions move outside the optimizer (selection biases) are saved with the parameters.
    owned = {(id(module), buffer) for module, buffer in run.decisions.updated_buffers()}
    run.trainable_names |= {f"{prefix}.{name}" for prefix, module in unwrapped.named_modules() for name, _ in module.named_buffers(recurse=False)
                            if (id(module), name) in owned}
    # Looked up again after prepare(): a sharded model holds new parameter objects.
    decision_ids = {id(p) for module in run.decisions.modules for p in module.parameters()}
    run.adapter_params = [p for p in unwrapped.parameters() if p.requires_grad and id(p) not in decision_ids]


def _restore(run: _Run) -> None:
    """Load the checkpoint (if resuming) and open the step log."""
    if run.checkpoint:
        meta = load_checkpoint(run.checkpoint, run.model, run.optimizer, run.scheduler, run.trainable_names)
        check_same_run(meta["options"], run.options.flat(), RESUMABLE_CHANGES)
        world = run.accelerator.num_processes
        if meta.get("processes", 1) != world:  # the data order and the tokens per step depend on it
            raise SparsifyError(f"cannot resume: the run used {meta.get('processes', 1)} processes, this launch has {world}")
        run.start_step = meta["step"]
        run.callbacks.on_status(f"resumed at step {run.start_step}")
    if run.accelerator.is_main_process:
        run.log = StepLog(run.run_dir / LOG, keep_through_step=run.start_step if run.checkpoint else None)


def _evaluate_before(run: _Run) -> dict[str, float]:
    if run.start_step:
        return _first_eval(run.run_dir / LOG)
    run.callbacks.on_status(f"held-out evaluation before training ({_heldout_blocks(run) * run.options.data.seq_len:,} tokens, "
                            "student and teacher)")
    before = _evaluate(run)
    if run.log:
        run.log.write({"step": 0, "eval": before})
    return before


def _train_steps(run: _Run) -> tuple[list[dict[str, Any]], float, int]:
    """The optimizer steps from the start (or the checkpoint) to the end: (entries, seconds, tokens)."""
    options, accelerator, callbacks = run.options, run.accelerator, run.callbacks
    callbacks.on_status("training")
    run.model.train()
    started, tokens_done = time.perf_counter(), 0
    history: list[dict[str, Any]] = []
    for step in range(run.start_step + 1, run.total_steps + 1):
        scheduled = run.decisions.on_step(step, run.total_steps)
        parts_sum = _accumulate_gradients(run, step)
        if run.phases.adapters_frozen(step):
            for param in run.adapter_params:  # AdamW skips a parameter without a gradient: no moments, no decay
                param.grad = None
        max_norm = options.optimisation.max_grad_norm
        grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), max_norm) if max_norm > 0 else None
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        updated = run.decisions.after_step(step)
        tokens_done += run.tokens_per_step
        elapsed = time.perf_counter() - started
        entry = {
            "step": step,
            "tokens": step * run.tokens_per_step,
            **{name: round(value, 6) for name, value in parts_sum.items()},
            **scheduled,
            **updated,
            "lr": run.scheduler.get_last_lr()[-1],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": round(tokens_done / elapsed, 1),
            "elapsed_s": round(elapsed, 3),
            "total_steps": run.total_steps,
        }
        eval_every = options.run.eval_every
        if eval_every and step % eval_every == 0 and step != run.total_steps:
            callbacks.on_status(f"held-out evaluation at step {step}")
            entry["eval"] = _evaluate(run)
            callbacks.on_status("training")
            run.model.train()
        if run.log:
            run.log.write(entry)
        history.append(entry)
        callbacks.on_step(entry)
        every = options.run.checkpoint_every
        if every and step % every == 0 and step != run.total_steps:
            _save_checkpoint(run, step)
    return history, time.perf_counter() - started, tokens_done


def _accumulate_gradients(run: _Run, step: int) -> dict[str, float]:
    """Forward and backward over the step's micro-batches; the loss parts averaged over them."""
    options, accelerator = run.options, run.accelerator
    accum, batch, world = options.optimisation.grad_accum, options.optimisation.batch_size, accelerator.num_processes
    parts_sum: dict[str, float] = {}
    for micro in range(accum):
        index = ((step - 1) * accum + micro) * world + accelerator.process_index
        order = block_order(run.train_data.num_blocks, options.optimisation.train_seed, index * batch, batch)
        ids = run.train_data.blocks(order).to(accelerator.device)
        parts = _losses(run, ids, order)
        if not torch.isfinite(parts["total"]):
            last = find_checkpoint(run.run_dir)
            kept = f"the last good checkpoint is {last} (resume with --resume)" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"the loss became {parts['total'].item()} at step {step}; training stopped and {kept}. Try a lower --lr/--router-lr"
            )
        accelerator.backward(parts["total"] / accum)
        for name, value in parts.items():
            parts_sum[name] = parts_sum.get(name, 0.0) + value.item() / accum
    return parts_sum


def _save_checkpoint(run: _Run, step: int) -> None:
    if run.teacher_cache is not None:
        run.teacher_cache.flush()  # what the resumed run will read must be on disk with the checkpoint
    trainable, optimizer_state = gather_trainable(run.model, run.trainable_names), gather_optimizer(run.model, run.optimizer)
    if run.accelerator.is_main_process:
        meta = {"options": run.options.flat(), "processes": run.accelerator.num_processes}
        save_checkpoint(run.run_dir, step, trainable, optimizer_state, run.scheduler, meta)
    run.accelerator.wait_for_everyone()


def _save(run: _Run, before: dict[str, float], after: dict[str, float]) -> None:
    """Merge the adapters into a fresh copy of the student and write the model folder."""
    trainable = gather_trainable(run.model, run.trainable_names)
    if run.accelerator.is_main_process:
        run.callbacks.on_status("merging adapters and saving")
        run.model = run.optimizer = None  # the merge rebuilds the model whole, on the CPU, from the trained state
        merged = _merged(run.model_dir, run.options, run.dtype, trainable, run.record)
        record = dict(run.record)
        variant = variant_of_record(record)
        weights_changed = run.options.lora.lora_rank > 0 or run.options.lora.full_experts  # not so when only routers or gates trained
        if variant is not None and record.get("layout") and weights_changed:
            # Merged adapters changed the weights: the dense path is no longer the teacher.
            record["layout"] = variant.layout(record["layout"]).without_dense_path().to_record()
        record["training"] = [*record.get("training", []), {
            "steps": run.total_steps, "tokens": run.total_steps * run.tokens_per_step, "options": run.options.flat(),
            "before": before, "after": after, "command": run.command,
        }]
        save_model_folder(merged, run.tokenizer, run.model_dir, run.output, record, overwrite=run.output == run.model_dir)
        shutil.rmtree(run.run_dir / CHECKPOINT, ignore_errors=True)  # the run is finished; log and data stay
    run.accelerator.wait_for_everyone()
def check_trainable(model_dir: Path, options: TrainOptions) -> None:
    """Refuse, before loading anything, a folder `sparsify train` cannot train as asked."""
    from sparsify.checkpoint_reader import check_weight_files

    if not (model_dir / "config.json").exists():
        raise SparsifyError(f"{model_dir} is not a model folder (no config.json); sparsify train takes a folder made by `sparsify upcycle`")
    check_weight_files(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    record = read_record(model_dir)
    if recognised(config) is None and options.distillation.teacher == "self" and converted_from(record) is None:
        raise SparsifyError(
            f"{model_dir} is a dense model ({config.get('model_type')}): it has no routers or gates, and as its own teacher LoRA "
            f"would learn nothing. Convert it first (`sparsify upcycle {model_dir} --to fine-moe -o OUT`, then `sparsify train OUT`), "
            "or pass --teacher MODEL to fine-tune it with LoRA against another model"
        )


def converted_from(record: dict[str, Any] | None, weights_change: bool = False) -> str | None:
    """The dense model an untrained conversion came from, as its teacher, where its own weights do not
    hold it (or will not, `weights_change`: its experts train in full); else None."""
    record = record or {}
    variant = variant_of_record(record)
    if variant is None or record.get("training") or not record.get("layout"):
        return None
    if variant.layout(record["layout"]).has_dense_path() and not weights_change:
        return None
    return source_reference(record)


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


def load_student(model_dir: Path, options: TrainOptions, dtype: torch.dtype, record: dict[str, Any] | None = None,
                 for_training: bool = True) -> tuple[Any, Decisions]:
    """The converted model with its decisions in fp32 and LoRA adapters: (model, decisions)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if for_training:
        model.config.use_cache = False
    decisions = find_decisions(model, read_record(model_dir) if record is None else record, options.variants)
    lora = options.lora
    return add_adapters(model, LoraSettings(lora.lora_rank, lora.lora_alpha, lora.adapter_targets, lora.full_experts), decisions), decisions


def _merged(model_dir: Path, options: TrainOptions, dtype: torch.dtype, trainable: dict[str, torch.Tensor], record: dict[str, Any]):
    """A fresh, whole copy of the student with the trained state loaded and LoRA folded in. Rebuilding
    it (instead of merging the training copy in place) is the same code for one process, DDP and FSDP."""
    student, decisions = load_student(model_dir, options, dtype, record, for_training=False)
    load_trainable_state(student, trainable)
    merged = merge_adapters(student)
    decisions.restore_dtype(dtype)
    if options.lora.full_experts:  # back from their fp32 master copy
        for weight in decisions.expert_weights(merged):
            weight.data = weight.data.to(dtype)
    return merged


def _teacher(options: TrainOptions, record: dict[str, Any], decisions: Decisions, dtype: torch.dtype, model_dir: Path) -> _Teacher:
    """The teacher. "self": adapters off and the decisions on their dense path (routers onto copy 0,
    skip gates open), from the student's own weights; else a separate frozen model."""
    teacher = options.distillation.teacher
    if teacher == "self":
        variant = variant_of_record(record)
        layout = variant.layout(record["layout"]) if variant is not None and record.get("layout") else None
        full = options.lora.full_experts
        if layout is None or not layout.has_dense_path() or full:
            source = converted_from(record, weights_change=full)
            if source is not None:
                # A conversion whose weights do not hold the dense model (refitted experts, pruned neurons,
                # experts that train themselves) learns from the dense model it was converted from.
                teacher = source
            elif full:
                raise SparsifyError("--train-experts full trains the weights the dense teacher would be computed from; "
                                    "pass --teacher with the dense model")
            elif decisions.modules:
                raise SparsifyError(
                    "this model's weights no longer contain its dense teacher (it was trained before, or not made by "
                    "sparsify upcycle); pass --teacher with the original dense model"
                )
    if teacher == "self":

        def self_teacher(model, ids):
            # Switch the inner peft model's adapters off, but run the forward through the
            # (possibly distributed) wrapper, as the student's own forward does.
            inner = model.module if hasattr(model, "module") else model
            adapters_off = inner.disable_adapter() if hasattr(inner, "disable_adapter") else nullcontext()
            dense = decisions.teacher_path(layout) if decisions.modules else nullcontext()
            with torch.no_grad(), adapters_off, dense:
                return model(input_ids=ids).logits

        return _Teacher(self_teacher, lambda model: model, str(model_dir))
    from sparsify.sources import load_model

    separate = load_model(teacher, dtype=dtype)
    separate.requires_grad_(False)

    def separate_teacher(model, ids):
        if next(separate.parameters()).device != ids.device:
            separate.to(ids.device)
            use_fast_experts(separate)  # an MoE teacher (sparsify distill's) on its device's experts implementation
        with torch.no_grad():
            return separate(ids).logits

    return _Teacher(separate_teacher, lambda model: separate, teacher)


def _losses(run: _Run, ids: torch.Tensor, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The step's loss parts: the divergence to the teacher (online, or the KL against the teacher cache), cross-entropy,
    the FFN outputs' (with --hidden-weight), the decisions' own; and the total."""
    distillation = run.options.distillation
    hidden = distillation.hidden_weight > 0
    # With --kl-weight 0 (plain fine-tuning on the text) the teacher does not run in training steps at all.
    soft = distillation.kl_weight > 0
    if soft and run.teacher_cache is not None:
        targets = run.teacher_cache.targets(blocks, lambda: run.teacher(run.model, ids), ids.device)
    elif soft or hidden:
        with capture_ffn_outputs(run.teacher.network(run.model)) if hidden else nullcontext({}) as teacher_ffn:
            teacher_logits = run.teacher(run.model, ids)
    with run.decisions.watch() as seen, capture_ffn_outputs(run.model) if hidden else nullcontext({}) as student_ffn:
        out = run.model(input_ids=ids)
    parts = {"ce": _ce(out.logits, ids, track_grad=distillation.ce_weight > 0)}
    tie, divergence = losses.DIVERGENCES[distillation.divergence]  # the teacher cache holds top-k log-probs: KL only
    if soft and run.teacher_cache is not None:
        parts["kl"] = losses.kl_to_top_k(out.logits, targets.logprobs, targets.ids, targets.tail, distillation.temperature)
    elif soft:
        parts[tie] = divergence(out.logits, teacher_logits, distillation.temperature)
        if tie != "kl":  # the KL is still logged, so that runs with different divergences compare
            with torch.no_grad():
                parts["kl"] = losses.kl_to_teacher(out.logits.detach(), teacher_logits, distillation.temperature)
    if hidden:
        parts["hidden"] = hidden_state_loss(student_ffn, teacher_ffn)
    auxiliary, decision_parts = run.decisions.loss(out, seen)
    total = distillation.ce_weight * parts["ce"] + auxiliary
    if soft:
        total = total + distillation.kl_weight * parts[tie]
    if hidden:
        total = total + distillation.hidden_weight * parts["hidden"]
    return {**parts, **decision_parts, "total": total}


def _ce(logits: torch.Tensor, ids: torch.Tensor, track_grad: bool) -> torch.Tensor:
    """Cross-entropy; without a weight it is only reported, so it keeps no graph (and no memory)."""
    with torch.set_grad_enabled(track_grad and torch.is_grad_enabled()):
        return losses.next_token_loss(logits, ids)


def _heldout_blocks(run: _Run) -> int:
    return min(run.heldout.num_blocks, max(1, run.options.data.heldout_tokens // run.options.data.seq_len))


def _evaluate(run: _Run) -> dict[str, float]:
    """Held-out perplexities, KL, top-1 agreement and the decisions' own figures (e.g. skip rate).
    The blocks are divided among the processes and the sums added up; a process with one batch
    fewer runs an uncounted one, because under FSDP every process must take part in every forward pass."""
    model, accelerator, batch = run.model, run.accelerator, run.options.optimisation.batch_size
    model.eval()
    blocks = _heldout_blocks(run)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, blocks, world))
    batches = [mine[i:i + batch] for i in range(0, len(mine), batch)]
    rounds = math.ceil(math.ceil(blocks / world) / batch)
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for round_index in range(rounds):
            counted = round_index < len(batches)
            ids = run.heldout.blocks(torch.tensor(batches[round_index] if counted else [0])).to(accelerator.device)
            teacher_logits = run.teacher(model, ids)
            with accelerator.autocast(), run.decisions.watch() as seen:
                student_logits = model(input_ids=ids).logits
            figures = {
                "student_nll": losses.next_token_loss(student_logits, ids), "teacher_nll": losses.next_token_loss(teacher_logits, ids),
                "kl": losses.kl_to_teacher(student_logits, teacher_logits), "top1_agreement": losses.top1_agreement(student_logits, teacher_logits),
                "blocks": torch.tensor(1.0), **run.decisions.heldout(seen),
            }
            n = ids.shape[0] if counted else 0  # an uncounted batch adds zeros, keeping every process's sums alike
            for name, value in figures.items():
                sums[name] = sums.get(name, 0.0) + n * value.detach().to(accelerator.device, torch.float64)
    names = list(sums)
    totals = accelerator.reduce(torch.stack([sums[name] for name in names]), "sum")
    mean = {name: (totals[i] / totals[names.index("blocks")]).item() for i, name in enumerate(names)}
    result = {
        "student_ppl": math.exp(mean.pop("student_nll")),
        "teacher_ppl": math.exp(mean.pop("teacher_nll")),
        "kl": mean.pop("kl"),
        "top1_agreement": mean.pop("top1_agreement"),
        "tokens": int(totals[names.index("blocks")].item()) * run.options.data.seq_len,
    }
    mean.pop("blocks")
    return {**result, **mean}


def _first_eval(log_path: Path) -> dict[str, float]:
    for line in log_path.read_text().splitlines():
        entry = json.loads(line)
        if entry["step"] == 0 and "eval" in entry:
            return entry["eval"]
    return {}


def _peak_memory() -> tuple[int, str]:
    """High-water mark of this process and what it counts: GPU allocations, or resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "GPU"
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM")), "resident"
