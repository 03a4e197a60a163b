"""The library pipeline: convert -> train -> evaluate -> push, as `sparsify upcycle --train` (and a recipe
runner) calls it. Each stage is also a function of its own: `sparsify.upcycle.upcycle`,
`sparsify.train.loop.train`, `sparsify.eval.run.evaluate`; this module only chains them, checking
every stage's options before the first one starts, so that a bad evaluation flag does not surface
after an hour of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from sparsify.eval.options import EvalOptions
    from sparsify.hub import PushOptions, PushResult
    from sparsify.train.loop import TrainResult
    from sparsify.train.options import TrainOptions
    from sparsify.upcycle import UpcycleResult


@dataclass
class PipelineResult:
    conversion: UpcycleResult
    training: TrainResult | None = None
    report: dict[str, Any] | None = None
    push: PushResult | None = None


@dataclass
class StageCallbacks:
    """Progress hooks per stage, as each stage's function takes them (keyword arguments)."""

    conversion: dict[str, Callable[..., Any]] = field(default_factory=dict)  # on_plan, on_bytes
    training: dict[str, Callable[..., Any]] = field(default_factory=dict)  # on_step, on_status, on_plan, on_notice
    evaluation: dict[str, Callable[..., Any]] = field(default_factory=dict)  # on_status, on_progress
    on_converted: Callable[[UpcycleResult], None] = lambda result: None
    on_trained: Callable[[TrainResult], None] = lambda result: None
    on_status: Callable[[str], None] = lambda text: None
    on_report: Callable[[dict[str, Any], Path], None] = lambda report, folder: None  # one evaluation's report and its folder
    on_compare: Callable[[list[dict[str, Any]], list[Path]], None] = lambda reports, folders: None
    on_pushed: Callable[[PushResult], None] = lambda result: None


def run_pipeline(
    model: str,
    to: str,
    output: str | Path,
    variant_options: dict[str, Any],
    *,
    train: TrainOptions | None = None,
    evaluate: EvalOptions | None = None,
    push: PushOptions | None = None,
    report_dir: str | Path | None = None,
    conversion: dict[str, Any] | None = None,
    command: str | None = None,
    callbacks: StageCallbacks | None = None,
) -> PipelineResult:
    """Convert `model` into `to` at `output`; then, if given, train it in place, evaluate it and push
    it. `conversion` holds upcycle's other keyword arguments (dtype, overwrite, revision, ...)."""
    from sparsify.upcycle import upcycle

    callbacks = callbacks or StageCallbacks()
    if train is not None:
        train.validate()  # refuse bad training options before converting
    if evaluate is not None:
        evaluate.validate()
    target = None
    if push is not None:  # a bad token or namespace fails now, not after the conversion and training
        from sparsify.hub import prepare_push

        target = prepare_push(push, on_status=callbacks.on_status)
    converted = upcycle(model, to, output, command=command, **(conversion or {}), **callbacks.conversion, **variant_options)
    callbacks.on_converted(converted)
    result = PipelineResult(converted)
    if train is not None:
        from sparsify.train.loop import train as train_model

        result.training = train_model(converted.output, train, command=command, **callbacks.training)
        callbacks.on_trained(result.training)
    if evaluate is not None:
        from sparsify.eval.run import evaluate as evaluate_model

        result.report = evaluate_model(str(converted.output), evaluate, output=Path(report_dir) if report_dir else None,
                                       **callbacks.evaluation)
    if target is not None:
        from sparsify.hub import publish

        result.push = publish(converted.output, target, on_status=callbacks.on_status)
        callbacks.on_pushed(result.push)
    return result
