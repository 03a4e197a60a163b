"""The `sparsify` command line: thin commands that parse, call the library, and print with rich.

Variant and training options are generated from the option dataclasses (each variant's options and
the groups of `TrainOptions`, the variants' training groups included), so a new field or a new
variant appears as flags, under their own help panels, without touching this file.
"""

import inspect
import shlex
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from sparsify.convert import VARIANTS
from sparsify.display import TrainingDisplay, err, out, print_eval_report, print_notes, verdict_cell
from sparsify.errors import SparsifyError
from sparsify.aliases import ALIASES, DEFAULT_MODEL
from sparsify.cli_run import _print_pushed, register as register_recipe_commands

app = typer.Typer(
    name="sparsify",
    help="Turn dense Hugging Face causal LMs into sparse ones (MoE, fine-grained MoE, layer skip), train their routers or "
         "gates, and measure them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


# --- options generated from dataclasses -------------------------------------------------------


def _without_none(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _default_text(options_cls: type, name: str) -> str:
    f = next(x for x in fields(options_cls) if x.name == name)
    value = f.default if f.default is not MISSING else None
    return "auto" if value is None else (str(value) if value != "" else "none")


def _with_help(f, text: str):
    """A copy of dataclass field `f` whose help is `text` (fields are shared; do not mutate)."""
    import copy

    changed = copy.copy(f)
    changed.metadata = {**f.metadata, "help": text}
    return changed


def _option(f, hint: Any, panel: str, default_text: str) -> inspect.Parameter:
    """A keyword-only typer option for one dataclass field; None means "not given"."""
    flag = "--" + f.name.replace("_", "-")
    option = typer.Option(
        None,
        # A boolean field is a switch both ways (--refit / --no-refit), so its default can be undone.
        f"{flag}/--no-{flag[2:]}" if _without_none(hint) is bool else flag,
        help=f"{f.metadata.get('help', '')} [dim](default {default_text})[/dim]",
        rich_help_panel=panel,
        show_default=False,
    )
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[_without_none(hint)])


def _variant_parameters() -> list[inspect.Parameter]:
    """One option per variant option field; a field several variants share appears once."""
    params: dict[str, inspect.Parameter] = {}
    for variant in VARIANTS.values():
        hints = typing.get_type_hints(variant.options)
        for f in fields(variant.options):
            if f.name in params:
                continue
            users = [c for c in VARIANTS.values() if f.name in {x.name for x in fields(c.options)}]
            per_variant = {c.name: _default_text(c.options, f.name) for c in users}
            defaults = (
                next(iter(per_variant.values()))
                if len(set(per_variant.values())) == 1
                else ", ".join(f"{name}: {value}" for name, value in per_variant.items())
            )
            panel = "Variant options (--to " + " / ".join(c.name for c in users) + ")"
            helps = {c.name: next(x for x in fields(c.options) if x.name == f.name).metadata.get("help", "") for c in users}
            if len(set(helps.values())) > 1:  # e.g. --experts: experts for moe, FFN copies for fine-moe
                f = _with_help(f, " ".join(f"{name}: {text}" for name, text in helps.items()))
            params[f.name] = _option(f, hints[f.name], panel, defaults)
    return list(params.values())


def _train_parameters(panel: str) -> list[inspect.Parameter]:
    """One option per field of every training group, under a panel per group."""
    from sparsify.train.options import TrainOptions

    params = []
    for section, group in TrainOptions.sections().items():
        hints = typing.get_type_hints(group)
        params += [_option(f, hints[f.name], f"{panel}: {section}", _default_text(group, f.name)) for f in fields(group)]
    return params


def _train_options(values: dict[str, Any]):
    from sparsify.train.options import TrainOptions

    names = {f.name for group in TrainOptions.sections().values() for f in fields(group)}
    return TrainOptions.of(**{k: v for k, v in values.items() if k in names and v is not None})


def _with_options(command, extra: list[inspect.Parameter]):
    """Replace the command's `**options` in the signature typer reads by explicit options."""
    signature = inspect.signature(command)
    fixed = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    var_kw = next(p.name for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD)
    command.__signature__ = signature.replace(parameters=fixed + extra)
    command.__annotations__ = {
        **{k: v for k, v in command.__annotations__.items() if k != var_kw},
        **{p.name: p.annotation for p in extra},
    }
    return command


# --- upcycle ----------------------------------------------------------------------------------


def upcycle(
    model: Annotated[str, typer.Argument(help=f"Hub id, local folder, .gguf file, or alias ({', '.join(ALIASES)}).")] = DEFAULT_MODEL,
    to: Annotated[str, typer.Option("--to", help="Target variant. " + " ".join(f"{c.name}: {c.summary}" for c in VARIANTS.values()))] = "fine-moe",
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (written atomically).")] = Path("out/model"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    train_after: Annotated[bool, typer.Option("--train", help="Then train the routers or skip gates (see the training options).")] = False,
    push_to_hub: Annotated[Optional[str], typer.Option(help="Then upload the folder to this Hub repository, NAMESPACE/NAME (private unless "
                                                            "--public); the token and repository are checked before converting.")] = None,
    public: Annotated[bool, typer.Option(help="With --push-to-hub: create the repository public.")] = False,
    **options: Any,
) -> None:
    """Convert a dense checkpoint into a sparse one: a native transformers MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) for
    --to moe / fine-moe, or the layer-skip architecture (remote code) for --to skip."""
    from sparsify.conversion_options import ConversionOptions
    from sparsify.display import ConversionDisplay
    from sparsify.pipeline import StageCallbacks, run_pipeline

    variant_names = {f.name for c in VARIANTS.values() for f in fields(c.options)}
    chosen = {k: v for k, v in options.items() if v is not None and k in variant_names}
    training = _train_options(options) if train_after else None
    conversion = _given(ConversionOptions, options)
    conversion.validate()
    conversion_display, display = ConversionDisplay(f"{to} from {model}"), TrainingDisplay()
    callbacks = StageCallbacks(conversion=conversion_display.callbacks(), training=display.callbacks(), on_converted=conversion_display.converted,
                               on_status=lambda text: err.print(f"[dim]{text}[/dim]", highlight=False),
                               on_pushed=_print_pushed)
    try:
        with display.stopping():
            result = run_pipeline(model, to, output, chosen, train=training, push=_push_options(push_to_hub, public),
                                  conversion={"overwrite": overwrite, **conversion.upcycle_arguments()},
                                  command=shlex.join(["sparsify", *sys.argv[1:]]), callbacks=callbacks)
    finally:
        conversion_display.stop()
    if result.training is not None:
        display.report(result.training)


def _given(options_cls: type, values: dict[str, Any]):
    """`options_cls` from the flags the user gave (None: not given, the field's default)."""
    names = {f.name for f in fields(options_cls)}
    return options_cls(**{k: v for k, v in values.items() if k in names and v is not None})


def _push_options(repo_id: Optional[str], public: bool):
    from sparsify.hub import PushOptions

    if repo_id is None:
        if public:
            raise SparsifyError("--public applies to --push-to-hub; add --push-to-hub NAMESPACE/NAME")
        return None
    return PushOptions(repo_id=repo_id, private=not public)


def _conversion_parameters() -> list[inspect.Parameter]:
    from sparsify.conversion_options import ConversionOptions

    hints = typing.get_type_hints(ConversionOptions)
    return [_option(f, hints[f.name], "Conversion options", _default_text(ConversionOptions, f.name)) for f in fields(ConversionOptions)]


_with_options(upcycle, _conversion_parameters() + _variant_parameters() + _train_parameters("Training options (with --train)"))
app.command(help=upcycle.__doc__)(upcycle)


# --- train ------------------------------------------------------------------------------------


def train(
    model: Annotated[Path, typer.Argument(help="A folder made by `sparsify upcycle` (MoE, fine-grained MoE or layer skip). A dense "
                                               "folder is accepted only with --teacher (a LoRA fine-tune against that model).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where the trained model goes (default: replace MODEL atomically at the end).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Checkpoints, log and tokenized data (default: OUTPUT.run).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the unfinished run in the run folder.")] = False,
    restart: Annotated[bool, typer.Option(help="Discard the unfinished run's checkpoint and start over.")] = False,
    push_to_hub: Annotated[Optional[str], typer.Option(help="Then upload the trained folder to this Hub repository, NAMESPACE/NAME "
                                                            "(private unless --public); checked before training starts.")] = None,
    public: Annotated[bool, typer.Option(help="With --push-to-hub: create the repository public.")] = False,
    **options: Any,
) -> None:
    """Train the routers or skip gates (in full) and LoRA adapters of a converted model with KL to its dense teacher;
    merge the adapters and save the model in its own format."""
    from sparsify.hub import prepare_push, publish
    from sparsify.train.loop import train as run_train

    settings, push = _train_options(options), _push_options(push_to_hub, public)
    settings.validate()
    target = prepare_push(push, on_status=lambda text: err.print(f"[dim]{text}[/dim]", highlight=False)) if push else None
    display = TrainingDisplay()
    with display.stopping():
        result = run_train(model, settings, output=output, run_dir=run_dir, resume=resume, restart=restart,
                           command=shlex.join(["sparsify", *sys.argv[1:]]), **display.callbacks())
    display.report(result)
    if target is not None:
        _print_pushed(publish(result.output, target))


_with_options(train, _train_parameters("Training options"))
app.command(help=train.__doc__)(train)


# --- distill ----------------------------------------------------------------------------------


def _command_parameters(options_class: type, title: str, excluded: Any, defaults: dict[str, Any]) -> list[inspect.Parameter]:
    """A training command's own options (distill, transition), then the training options it does not set
    itself, with its own defaults in their help."""
    hints = typing.get_type_hints(options_class)
    own = [_option(f, hints[f.name], title, _default_text(options_class, f.name)) for f in fields(options_class)]
    training = []
    for param in _train_parameters("Training options"):
        if param.name in excluded:
            continue
        if param.name in defaults:
            option = param.default
            option.help = option.help.rsplit(" [dim](default", 1)[0] + f" [dim](default {defaults[param.name]})[/dim]"
        training.append(param)
    return own + training


def _run_training_command(run: Callable, options_class: type, defaults: dict[str, Any], model: Path, output: Path,
                          run_dir: Path | None, resume: bool, restart: bool, options: dict[str, Any]) -> Any:
    """A training command (distill, transition) from its flags: its options, its training options (none with
    --tokens 0), run under the training display, whose summary is shown at the end."""
    from sparsify.option_values import parse_count

    settings = _given(options_class, options)
    training = _train_options({**defaults, **{k: v for k, v in options.items() if v is not None}})
    if parse_count(training.data.tokens) == 0:
        settings.untrained(training)
        training = None
    display = TrainingDisplay()
    callbacks = display.callbacks()
    with display.stopping():
        result = run(model, output, settings, training, run_dir=run_dir, resume=resume, restart=restart,
                     command=shlex.join(["sparsify", *sys.argv[1:]]), on_status=callbacks["on_status"], train_callbacks=callbacks)
    if result.training is not None:
        display.report(result.training)
    return result


def _distill_parameters() -> list[inspect.Parameter]:
    from sparsify.convert.distill.options import DERIVED_TRAINING, TRAINING_DEFAULTS, DistillOptions

    return _command_parameters(DistillOptions, "Distillation", DERIVED_TRAINING, TRAINING_DEFAULTS)


def distill(
    model: Annotated[Path, typer.Argument(help="The sparse model to fold back: an MoE folder (made by `sparsify upcycle --to moe/fine-moe`, "
                                               "or any Mixtral, Qwen2-MoE, Qwen3-MoE or GLM-4.5-MoE folder).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the dense student goes (written atomically).")],
    run_dir: Annotated[Optional[Path], typer.Option(help="The folded student, checkpoints, log and tokenized data (default: OUTPUT.run).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the unfinished run in the run folder.")] = False,
    restart: Annotated[bool, typer.Option(help="Discard the unfinished run (and the folded student) and start over.")] = False,
    **options: Any,
) -> None:
    """Distil a sparse model back into a dense one of its parent's size and family (loadable by plain transformers):
    fold the experts into one FFN per layer (--init), then train it with KL to the sparse model mixed with the
    next-token loss (--hard-weight). --tokens 0 writes the folded student without training."""
    from sparsify.convert.distill.options import TRAINING_DEFAULTS, DistillOptions
    from sparsify.convert.distill.run import distill as run_distill

    result = _run_training_command(run_distill, DistillOptions, TRAINING_DEFAULTS, model, output, run_dir, resume, restart, options)
    folded = f"folded with --init {result.init}" + (f" (expert usage measured on {result.usage_tokens:,} tokens)" if result.usage_tokens else "")
    out.print(f"dense student -> {result.output}: {folded}" + ("" if result.training else ", not trained (--tokens 0)"), soft_wrap=True)


_with_options(distill, _distill_parameters())
app.command(help=distill.__doc__)(distill)


# --- transition -------------------------------------------------------------------------------

def _transition_parameters() -> list[inspect.Parameter]:
    from sparsify.convert.mot.options import TRANSITION_TRAINING_DEFAULTS, TransitionOptions

    # The teacher is transition's own --teacher (default: the MoT's dense source).
    return _command_parameters(TransitionOptions, "Transition", {"teacher"}, TRANSITION_TRAINING_DEFAULTS)


def transition(
    model: Annotated[Path, typer.Argument(help="A Mixture-of-Tokens folder (made by `sparsify upcycle --to mot`, usually trained).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the native MoE goes (written atomically).")],
    run_dir: Annotated[Optional[Path], typer.Option(help="The untrained MoE, checkpoints, log and tokenized data (default: OUTPUT.run).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the unfinished run in the run folder.")] = False,
    restart: Annotated[bool, typer.Option(help="Discard the unfinished run and start over.")] = False,
    **options: Any,
) -> None:
    """Transition tuning: turn a Mixture-of-Tokens model into a native sparse MoE (Mixtral, Qwen2-MoE or
    Qwen3-MoE; per-token top-k, no batch dependence) with the controllers as routers and the experts as they
    are, then train it briefly against the dense teacher (balance and z losses on). --tokens 0 writes it untrained."""
    from sparsify.convert.mot.options import TRANSITION_TRAINING_DEFAULTS, TransitionOptions
    from sparsify.convert.mot.transition import transition as run_transition

    result = _run_training_command(run_transition, TransitionOptions, TRANSITION_TRAINING_DEFAULTS, model, output, run_dir, resume, restart,
                                   options)
    out.print(f"native MoE (top-{result.top_k}) -> {result.output}" + ("" if result.training else ", not trained (--tokens 0)"), soft_wrap=True)


_with_options(transition, _transition_parameters())
app.command(help=transition.__doc__)(transition)


# --- generate ---------------------------------------------------------------------------------


def generate(
    model: Annotated[str, typer.Argument(help="A folder, .gguf file, alias (smollm2-135m) or Hub id; --speculative needs a skip model.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt; repeat the flag for a batch.")],
    **options: Any,
) -> None:
    """Generate text. With --speculative a skip model drafts with its gates and verifies with every gate open,
    so the output is its dense teacher's, and the summary says how many drafts were accepted."""
    from sparsify.generate import generate as run_generate
    from sparsify.generate_options import GenerateOptions

    settings = _given(GenerateOptions, options)
    settings.validate()
    with err.status("starting") as status:
        result = run_generate(model, prompt, settings, on_status=lambda text: status.update(text))
    from rich.text import Text

    for text, continuation in zip(result.prompts, result.texts):  # as text: brackets in code are not markup, lines not re-wrapped
        out.print(Text.assemble((text, "bold"), continuation), highlight=False, soft_wrap=True)
    table = Table(title=f"{model}: {result.engine}")
    rows = [("prompts", str(len(result.prompts))), ("new tokens", str(result.new_tokens)),
            ("tokens/s (all prompts)", f"{result.tokens_per_second:.1f}")]
    if result.speculative:
        s = result.speculative
        rows += [("draft", result.draft or ""), ("drafted per verification", str(s["draft_tokens"])), ("verifications", str(s["rounds"])),
                 ("drafts accepted", f"{s['acceptance_rate']:.1%}"), ("tokens per verification", f"{s['tokens_per_round']:.2f}"),
                 ("accepted drafts 0..k (count)", " ".join(map(str, s["accepted_histogram"])))]
    table.add_column("")
    table.add_column("", justify="right")
    for row in rows:
        table.add_row(*row)
    err.print(table)
    print_notes(result.notes)


def _generate_parameters() -> list[inspect.Parameter]:
    from sparsify.generate_options import GenerateOptions

    hints = typing.get_type_hints(GenerateOptions)
    return [_option(f, hints[f.name], "Generation options", _default_text(GenerateOptions, f.name)) for f in fields(GenerateOptions)]


_with_options(generate, _generate_parameters())
app.command(help=generate.__doc__)(generate)


# --- eval / compare ---------------------------------------------------------------------------


def _eval_parameters(panel: str) -> list[inspect.Parameter]:
    from sparsify.eval.options import EvalOptions

    hints = typing.get_type_hints(EvalOptions)
    return [_option(f, hints[f.name], panel, _default_text(EvalOptions, f.name)) for f in fields(EvalOptions)]


def evaluate(
    model: Annotated[str, typer.Argument(help="The model to measure: a folder, .gguf file, alias (smollm2-135m) or Hub id.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Report folder: report.json, report.md, PNG plots.")] = None,
    card: Annotated[bool, typer.Option(help="Also put the report's tables into MODEL's README.md (model card).")] = False,
    **options: Any,
) -> None:
    """Measure quality, cost and routing of a model against its teacher; write one report."""
    from sparsify.eval.options import EvalOptions
    from sparsify.eval.run import evaluate as run_eval

    names = {f.name for f in fields(EvalOptions)}
    settings = EvalOptions(**{k: v for k, v in options.items() if k in names and v is not None})
    progress = Progress(TextColumn("[bold]eval"), BarColumn(), TextColumn("{task.fields[status]}"), console=err, transient=True)
    task = progress.add_task("eval", total=None, status="starting")
    with progress:
        report = run_eval(
            model, settings, output=output, card=card,
            on_status=lambda text: progress.update(task, status=text, completed=0, total=None),
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    print_eval_report(report, output)


_with_options(evaluate, _eval_parameters("Evaluation options"))
app.command(name="eval", help=evaluate.__doc__)(evaluate)


@app.command()
def compare(reports: Annotated[list[Path], typer.Argument(help="Report folders (or report.json files) written by `sparsify eval`.")]) -> None:
    """Side-by-side table of several eval reports (the model's figures of each)."""
    from sparsify.display import print_compare
    from sparsify.eval.report import load_report

    print_compare([load_report(path) for path in reports], reports)


def skip_sweep(
    model: Annotated[str, typer.Argument(help="A layer-skip model folder (from `sparsify upcycle --to skip`).")],
    thresholds: Annotated[str, typer.Option(help="Inference thresholds to try, comma-separated.")] = "0.3,0.5,0.7",
    windows: Annotated[str, typer.Option(help="Context lengths at which perplexity and skip rate are measured.")] = "512,2048",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for sweep.json and sweep.png.")] = None,
    freeze_below: Annotated[Optional[float], typer.Option(
        help="Freeze gates that skip less than this share of calibration tokens: their sublayer always runs and no gate "
             "is evaluated (saves the gate's cost where it barely decides).")] = None,
    freeze_above: Annotated[Optional[float], typer.Option(
        help="Freeze gates that skip more than this share: their sublayer never runs.")] = None,
    calibration_data: Annotated[Optional[str], typer.Option(
        help="Text whose skip rates choose the frozen gates (default: the held-out --data itself).")] = None,
    **options: Any,
) -> None:
    """Quality (several context lengths), skip rate and measured speed at several thresholds, vs the teacher."""
    from sparsify.eval.options import EvalOptions
    from sparsify.convert.skip.freezing import FreezeRule
    from sparsify.convert.skip.sweep import skip_sweep as run_sweep
    from sparsify.convert.skip.sweep import sweep_table

    from sparsify.option_values import parse_numbers

    names = {f.name for f in fields(EvalOptions)}
    settings = EvalOptions(**{k: v for k, v in options.items() if k in names and v is not None})
    threshold_values = parse_numbers(thresholds, float, "--thresholds", lambda t: 0 < t < 1, "between 0 and 1")
    window_values = parse_numbers(windows, int, "--windows", lambda w: w >= 2, "of at least 2 tokens")
    freeze = FreezeRule.from_options(freeze_below, freeze_above)
    with err.status("sweeping") as status:
        result = run_sweep(model, threshold_values, window_values, settings,
                           output=output, freeze=freeze, calibration_data=calibration_data,
                           on_status=lambda text: status.update(f"sweeping: {text}"))
    columns, rows = sweep_table(result)
    table = Table(title=f"{model}: skip threshold sweep (perplexity at window {result['windows'][-1]})")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    print_notes(result.get("notes", []))
    if output:
        out.print(f"sweep: {Path(output) / 'sweep.json'} and sweep.png")


_with_options(skip_sweep, [p for p in _eval_parameters("Evaluation options") if p.name not in ("suite", "tasks", "tasks_path", "task_limit", "num_fewshot", "window", "stride")])
app.command(name="skip-sweep", help=skip_sweep.__doc__)(skip_sweep)


@app.command(name="skip-freeze")
def skip_freeze(
    model: Annotated[Path, typer.Argument(help="A layer-skip model folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the model with its serving settings.")],
    data: Annotated[str, typer.Option(help="Calibration text (.txt/.jsonl[.gz] files, comma-separated): use training text, "
                                           "not the held-out text you report on.")],
    threshold: Annotated[Optional[float], typer.Option(help="Inference threshold to serve at (default: the model's).")] = None,
    freeze_below: Annotated[float, typer.Option(
        help="Gates skipping less than this share of calibration tokens always run their sublayer (no gate evaluated).")] = 0.05,
    freeze_above: Annotated[float, typer.Option(help="Gates skipping more than this share never run it.")] = 1.0,
    tokens: Annotated[str, typer.Option(help="Calibration tokens.")] = "64k",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Fix a skip model's threshold and freeze the gates that barely decide, measured on calibration text (see skip-sweep
    --freeze-below/--freeze-above for the trade-off); writes a new folder that loads and serves with those settings."""
    from sparsify.eval.run import shortfall_note
    from sparsify.convert.skip.freezing import FreezeRule
    from sparsify.convert.skip.frozen_copy import write_frozen_copy
    from sparsify.option_values import parse_count

    with err.status("measuring gate skip rates"):
        result = write_frozen_copy(model, output, FreezeRule(freeze_below, freeze_above), data, threshold=threshold, tokens=tokens,
                                   overwrite=overwrite, command=shlex.join(["sparsify", *sys.argv[1:]]))
    table = Table(title=f"{output}: threshold {result.threshold:g}, {result.calibration_tokens:,} calibration tokens, "
                        f"{result.skip_rate:.1%} skipped before freezing")
    for column in ("sublayer", "always run", "always skip", "per token", "skip rate of per-token gates"):
        table.add_column(column, justify="right")
    for sublayer in dict.fromkeys(g["sublayer"] for g in result.gates):
        rows = [g for g in result.gates if g["sublayer"] == sublayer]
        deciding = [g["skip_rate"] for g in rows if g["decision"] == "per token"]
        table.add_row(sublayer, *(str(sum(g["decision"] == d for g in rows)) for d in ("run", "skip", "per token")),
                      f"{sum(deciding) / len(deciding):.1%}" if deciding else "-")
    out.print(table)
    note = shortfall_note("the calibration rates", parse_count(tokens), result.calibration_tokens)
    print_notes([note] if note else [])


@app.command(name="draft-plan")
def draft_plan(
    model: Annotated[Path, typer.Argument(help="A layer-skip model folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the copy that carries the draft plan.")],
    data: Annotated[str, typer.Option(help="Tune text (.txt/.jsonl[.gz] files, comma-separated): training text, "
                                           "not the held-out text you report on.")],
    share: Annotated[float, typer.Option(help="Share of the gated sublayers every draft token skips (no gate, no K/V written).")] = 0.3,
    windows: Annotated[int, typer.Option(help="Tune windows the search scores each candidate on.")] = 16,
    window_len: Annotated[int, typer.Option(help="Tokens per tune window.")] = 256,
    on_policy: Annotated[int, typer.Option(help="Score the draft on the teacher's own text: each window becomes a prompt "
                                                "the teacher continues greedily by this many tokens, and only the positions "
                                                "from the prompt's last on are scored (0: score the tune text itself).")] = 0,
    device: Annotated[str, typer.Option(help="auto (cuda if present), cpu, cuda.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Find the sublayers a self-speculative draft can drop and still agree with the teacher (greedy
    elimination by top-1 agreement on tune text) and write a copy of the model whose config carries that
    static draft plan, used by `generate --speculative` and `eval --decode-engine speculative`."""

    from sparsify.convert.skip.draft_copy import write_draft_plan_copy

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("searching the draft plan (sublayers dropped)", total=None)
        result = write_draft_plan_copy(model, output, data, share=share, windows=windows, window_len=window_len, device=device,
                                       overwrite=overwrite, on_policy=on_policy, command=shlex.join(["sparsify", *sys.argv[1:]]),
                                       on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    table = Table(title=f"{output}: draft plan scored at {result.tune_tokens:,} positions of {result.scored_on}")
    for column in ("sublayers dropped", "share", "top-1 agreement with the teacher", "KL, nats/token"):
        table.add_column(column, justify="right")
    for step in result.curve:
        table.add_row(str(step["dropped"]), f"{step['share']:.0%}", f"{step['agreement']:.1%}", f"{step['kl']:.3f}")
    out.print(table)
    out.print(f"draft: {result.plan.summary(result.gated_sublayers)}; skipped: {', '.join(result.plan.skip) or 'none'}", soft_wrap=True)


@app.command(name="draft-head")
def draft_head(
    model: Annotated[Path, typer.Argument(help="A model folder: a skip model, or any Llama-style dense model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the copy that carries the draft head (draft_head/).")],
    data: Annotated[str, typer.Option(help="Training text (.txt/.jsonl[.gz] files, comma-separated), not the held-out text "
                                           "you report on. The last windows read are kept apart to score the head.")],
    steps: Annotated[int, typer.Option(help="Training batches (each window is read once where the text suffices).")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Windows per batch.")] = 8,
    window_len: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 1e-3,
    depth: Annotated[int, typer.Option(help="Draft chain depth the loss covers: 1 trains the first draft only; more trains "
                                            "each draft on the head's own previous output, as decoding uses it.")] = 2,
    score_windows: Annotated[int, typer.Option(help="Windows kept apart to score the head before and after.")] = 16,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (a killed run resumes from the last).")] = 200,
    feature_weight: Annotated[float, typer.Option(help="Weight of the pull of each draft feature to the teacher's state "
                                                       "(EAGLE; 0: cross-entropy alone, as EAGLE-3).")] = 1.0,
    feature_layers: Annotated[str, typer.Option(help="The teacher layers whose outputs the head reads, comma-separated (e.g. "
                                                     "2,15,29: low, middle and top, as EAGLE-3), fused by one linear; top: "
                                                     "the last layer's alone.")] = "top",
    fit_on: Annotated[str, typer.Option(help="corpus: train on the text as it is; teacher: on each window's first half followed "
                                              "by the teacher's greedy continuation (what the head meets when drafting; "
                                              "generated first, fast on a GPU).")] = "corpus",
    device: Annotated[str, typer.Option(help="auto (cuda if present), cpu, cuda.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Train a draft head for speculative decoding: one decoder layer that drafts the next tokens from the
    teacher's own top hidden state (EAGLE-style), verified by the teacher, so the output stays the
    teacher's. Writes a copy of the model with the head; `generate --speculative` and `eval
    --decode-engine speculative` draft with it. A killed run resumes when given the same command."""
    from sparsify.convert.skip.draft_head_copy import write_draft_head_copy
    from sparsify.convert.skip.draft_head_training import DraftHeadOptions

    from sparsify.option_values import parse_list

    try:
        layers = () if feature_layers == "top" else tuple(int(v) for v in parse_list(feature_layers))
    except ValueError:
        raise SparsifyError(f"--feature-layers takes layer numbers, comma-separated, or top; got '{feature_layers}'") from None
    options = DraftHeadOptions(steps=steps, batch_size=batch_size, window_len=window_len, lr=lr, depth=depth, score_windows=score_windows,
                               checkpoint_every=checkpoint_every, feature_layers=layers, feature_weight=feature_weight)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"))
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("training the draft head", total=steps)
        result = write_draft_head_copy(model, output, data, options, device=device, fit_on=fit_on, overwrite=overwrite,
                                       command=shlex.join(["sparsify", *sys.argv[1:]]),
                                       on_step=lambda step, total, loss: progress.update(
                                           task, completed=step, description=f"training the draft head (loss {loss:.3f})"))
    fit = result.fit
    table = Table(title=f"{output}: draft head, scored on {fit.scores.chains:,} chains of the teacher's own continuations")
    for column in ("", "first-draft agreement (tune text)", *(f"accepted drafts per round, k = {k}" for k in (1, 2, 4))):
        table.add_column(column, justify="right")
    for name, scores in (("before training", fit.scores_before), ("after training", fit.scores)):
        depth_rows = [f"{scores.accepted_per_round(k):.2f}" if k <= len(scores.accept_by_depth) else "-" for k in (1, 2, 4)]
        table.add_row(name, f"{scores.agreement:.1%}", *depth_rows)
    out.print(table)
    resumed = f", resumed from step {fit.resumed_from}" if fit.resumed_from else ""
    out.print(f"{fit.steps} steps, {fit.tokens_seen:,} tokens over {fit.fit_windows:,} windows, {fit.seconds:.0f} s on {result.device}{resumed}")


# --- info -------------------------------------------------------------------------------------


@app.command()
def info(folder: Annotated[Path, typer.Argument(help="A model folder (converted by sparsify or not).")]) -> None:
    """Variant, experts, granularity, total vs active parameters, and whether it reproduces its teacher now."""
    from rich.markup import escape

    from sparsify.info import describe, layout_rows, source_line, training_summary

    described = describe(folder)
    table = Table(title=str(folder), show_header=False)
    rows = [
        ("architecture", described.architecture),
        ("variant", described.variant),
        ("total parameters", f"{described.total_params:,}"),
        ("active parameters", f"{described.active_params:,} ({described.active_params / described.total_params:.1%})"),
    ]
    rows += layout_rows(described.variant, described.layout)
    if described.reproduces_teacher is not None:
        rows.append(("reproduces teacher", verdict_cell(described.reproduces_teacher)))
    if described.source:
        rows.append(("source", escape(source_line(described.source))))
    for run in described.training:
        rows.append(("training", training_summary(run, described.variant)))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


register_recipe_commands(app)


def main() -> None:
    import os
    import warnings

    # transformers' own logs, warnings and progress bars would interleave with our rich display;
    # keep the terminal to sparsify's output unless the user asks for transformers' logs. Set
    # before transformers is imported (only the commands that need it import it), which is when
    # it reads them.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        # Some loaders (transformers' GGUF dequantisation) use plain tqdm, which only this silences.
        os.environ.setdefault("TQDM_DISABLE", "1")
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            for module in ("transformers", "torch", "peft", "accelerate", "huggingface_hub", "datasets"):
                warnings.filterwarnings("ignore", category=category, module=module)
    try:
        app()
    except SparsifyError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(1)
