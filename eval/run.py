"""The `sparsify eval` pipeline: load, measure each requested suite, write the report."""

from __future__ import annotations

import datetime
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsify.convert import hooks
from sparsify.errors import SparsifyError
from sparsify.eval import cost
from sparsify.eval.options import EvalOptions
from sparsify.eval.plots import routing_plots
from sparsify.eval.probes import probe_kinds
from sparsify.eval.quality import measure_quality
from sparsify.eval.report import SCHEMA, SCHEMA_VERSION, embed_in_card, write_report
from sparsify.eval.routing import measure_routing
from sparsify.eval.text import EvalText, build_eval_text
from sparsify.option_values import dtype_name, parse_count, parse_list, torch_dtype
from sparsify.provenance import read_record, versions

# Used for the speed measurement when no --data is given: real English, not random ids, because
# routing (and so speed) of a MoE depends on what the tokens are.
SPEED_TEXT = (
    "The kernel's memory manager keeps track of every page of physical memory. When a process asks for more, "
    "the allocator looks for a free block of the right size, splits a larger one if it must, and hands it over. "
    "Python's standard library offers tools for the same job at a higher level: lists grow as items arrive, and "
    "the garbage collector returns memory that nothing refers to any longer."
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SparsifyError(f"--device must be auto, cpu, cuda or cuda:N, got '{name}'") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparsifyError(f"--device {name}: no CUDA device here; use --device cpu")
    return device


def load_for_eval(ref: str, dtype: torch.dtype, device: torch.device):
    from sparsify.experts import use_fast_experts
    from sparsify.sources import load_model, load_tokenizer

    try:
        model = load_model(ref, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise SparsifyError(f"could not load {ref} as a causal language model ({type(error).__name__}: {error})") from error
    model = model.to(device).eval()
    use_fast_experts(model)  # an MoE runs the experts implementation chosen for this device
    return model, load_tokenizer(ref)


def _describe(ref: str, model) -> dict[str, Any]:
    path = Path(ref)
    record = read_record(path) if path.is_dir() else None
    return {
        "ref": ref,
        "name": path.name if path.exists() else ref,
        "architecture": type(model).__name__,
        "variant": (record or {}).get("variant", "dense"),
    }


def eval_text(options: EvalOptions, tokenizer, tokens: str | None = None) -> EvalText:
    """Held-out text of `tokens` tokens (default --tokens) from --data."""
    from sparsify.data import iter_documents

    sources = parse_list(options.data)
    documents = (doc for source in sources for doc in iter_documents(source, options.text_field))
    return build_eval_text(documents, tokenizer, parse_count(tokens or options.tokens))


def shortfall_note(what: str, asked: int, seen: int) -> str | None:
    """Say so when a measurement covered fewer tokens than asked (the data ran out)."""
    if seen >= asked:
        return None
    return f"{what} cover {seen:,} tokens, not the {asked:,} asked: the data has no more text"


def measure_model_speed(model, tokenizer, options: EvalOptions, sample: torch.Tensor) -> dict[str, Any]:
    """Prefill/decode speed with the speed settings of `options` (shared by eval and skip-sweep)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return cost.measure_speed(model, sample, batch_sizes=options.speed_batches, prompt_len=options.prompt_len,
                              decode_tokens=options.decode_tokens, warmup=options.warmup, repeats=options.repeats, pad_token_id=pad,
                              decode_engine=options.decode_engine, draft_tokens=options.draft_tokens,
                              draft_threshold=options.draft_threshold, draft=options.draft)


def _cost(model, tokenizer, options: EvalOptions, sample: torch.Tensor, context: int) -> dict[str, Any]:
    params = cost.parameter_counts(model)
    return {
        "params": params,
        "flops_per_token": cost.flops_per_token(model, params, context),
        "speed": measure_model_speed(model, tokenizer, options, sample),
    }


def _plots(report: dict[str, Any], output: Path) -> list[Path]:
    if not report.get("routing"):
        return []
    try:
        return routing_plots(report["routing"], output)
    except ImportError:  # matplotlib is a dependency, but a stripped-down environment may lack it
        report["notes"] = [*report.get("notes", []), "plots skipped: matplotlib is not installed"]
        return []


def evaluate(
    model_ref: str,
    options: EvalOptions,
    *,
    output: Path | None = None,
    card: bool = False,
    on_status: Callable[[str], None] = lambda text: None,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, Any]:
    from sparsify.sources import check_model_ref

    options.validate()
    suites = options.suites
    if card and not Path(model_ref).is_dir():
        raise SparsifyError("--card writes into the model folder's README.md; MODEL must be a local folder")
    check_model_ref(model_ref)  # both refused before either model is loaded
    if options.teacher:
        check_model_ref(options.teacher, "--teacher")
    device = resolve_device(options.device)
    name = dtype_name(options.dtype)
    dtype = torch_dtype(name) if name != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    on_status(f"loading {model_ref}")
    model, tokenizer = load_for_eval(model_ref, dtype, device)
    teacher = teacher_tokenizer = None
    if options.teacher:
        on_status(f"loading teacher {options.teacher}")
        teacher, teacher_tokenizer = load_for_eval(options.teacher, dtype, device)
        if teacher.get_output_embeddings().weight.shape[0] != model.get_output_embeddings().weight.shape[0]:
            raise SparsifyError("the model and the teacher have different vocabularies; KL and agreement need the same tokenizer")

    report: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": _describe(model_ref, model),
        "teacher": _describe(options.teacher, teacher) if teacher is not None else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "settings": dict(vars(options)),
        "versions": versions(),
    }
    text = eval_text(options, tokenizer) if {"quality", "routing"} & set(suites) or options.data else None
    if text is not None and "quality" in suites:
        note = shortfall_note("quality figures", parse_count(options.tokens), len(text.ids))
        if note:
            report["notes"] = [*report.get("notes", []), note]
    if "quality" in suites:
        on_status("quality: sliding-window perplexity" + (" and agreement with the teacher" if teacher is not None else ""))
        report["quality"] = measure_quality(model, text, window=options.window, stride=options.stride, batch_size=options.batch_size,
                                            teacher=teacher, on_progress=on_progress)
        # Settings a variant's model can be run at besides its own (a MoT's other group sizes), scored the same way.
        for setting, context in [item for hook in hooks("quality_settings") for item in hook(model).items()]:
            on_status(f"quality: {setting}")
            with context:
                measured = measure_quality(model, text, window=options.window, stride=options.stride, batch_size=options.batch_size, teacher=teacher)
            report["quality"].setdefault("settings", {})[setting] = {key: measured[key] for key in ("model", "vs_teacher") if key in measured}
    if "routing" in suites:
        on_status("routing: what the model's sparse decisions did")
        asked = parse_count(options.routing_tokens)
        # The quality text holds --tokens tokens; routing may ask for more.
        routing_text = text if asked <= parse_count(options.tokens) else eval_text(options, tokenizer, options.routing_tokens)
        report["routing"] = measure_routing(model, routing_text, block=options.window, batch_size=options.batch_size, max_tokens=asked)
        seen = next(iter((report["routing"] or {}).values()), {}).get("tokens", asked)
        note = shortfall_note("routing statistics", asked, seen)
        if note:
            report["notes"] = [*report.get("notes", []), note]
    if "cost" in suites:
        sample = text.ids[1:] if text is not None else torch.tensor(tokenizer(SPEED_TEXT)["input_ids"])
        on_status("cost: speed of the model")
        report["cost"] = {"model": _cost(model, tokenizer, options, sample, options.window)}
        if teacher is not None:
            on_status("cost: speed of the teacher")
            report["cost"]["teacher"] = _cost(teacher, teacher_tokenizer, options.for_teacher(), sample, options.window)
        report["cost"]["process_peak_rss_bytes"] = cost.process_peak_rss_bytes()
        flops = report["cost"]["model"]["flops_per_token"]
        kinds = probe_kinds()
        for kind, summary in (report.get("routing") or {}).items():
            at_activity = kinds[kind].flops_at_activity(model, flops, summary) if kind in kinds else None
            if at_activity is not None:  # e.g. skipped sublayers taken off
                flops[kinds[kind].flops_key] = at_activity
    if "tasks" in suites:
        from sparsify.eval.tasks import run_tasks

        task_settings = {"task_paths": options.task_paths, "batch_size": options.batch_size,
                         "limit": options.task_limit or None, "num_fewshot": None if options.num_fewshot < 0 else options.num_fewshot}
        on_status(f"tasks: {options.tasks}")
        report["tasks"] = {"model": run_tasks(model, tokenizer, options.task_names, **task_settings)}
        if teacher is not None:
            on_status(f"tasks: {options.tasks} (teacher)")
            report["tasks"]["teacher"] = run_tasks(teacher, teacher_tokenizer, options.task_names, **task_settings)

    plots: list[Path] = []
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        plots = _plots(report, output)
        write_report(output, report, plots)
    if card:
        # The model folder keeps its own copy of the report, plots included: drawn here when no -o has them.
        with tempfile.TemporaryDirectory(prefix="sparsify-plots-") as scratch:
            embed_in_card(Path(model_ref), report, plots if output is not None else _plots(report, Path(scratch)))
    return report
