"""The `sparsify` command line: thin commands that parse, call the library, and print with rich.

`upcycle`'s variant options are generated from the converters' option dataclasses, so a new
converter's fields appear as flags (under their own help panel) without touching this file.
"""

import inspect
import shlex
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from sparsify.convert import CONVERTERS
from sparsify.errors import SparsifyError
from sparsify.sources import ALIASES, DEFAULT_MODEL

app = typer.Typer(
    name="sparsify",
    help="Turn dense Hugging Face causal LMs into sparse ones (MoE, fine-grained MoE) and measure them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console()
err = Console(stderr=True)


def _variant_parameters() -> list[inspect.Parameter]:
    """One keyword-only CLI option per converter option field (shared names appear once)."""
    params: dict[str, inspect.Parameter] = {}
    for converter in CONVERTERS.values():
        hints = typing.get_type_hints(converter.options)
        for f in fields(converter.options):
            if f.name in params:
                continue
            base = _without_none(hints[f.name])
            users = [c.name for c in CONVERTERS.values() if f.name in {x.name for x in fields(c.options)}]
            per_variant = {c.name: _default_text(c.options, f.name) for c in CONVERTERS.values() if c.name in users}
            if len(set(per_variant.values())) == 1:
                defaults = next(iter(per_variant.values()))
            else:
                defaults = ", ".join(f"{name}: {value}" for name, value in per_variant.items())
            option = typer.Option(
                None,
                "--" + f.name.replace("_", "-"),
                help=f"{f.metadata.get('help', '')} [dim](default {defaults})[/dim]",
                rich_help_panel="Variant options (--to " + " / ".join(users) + ")",
                show_default=False,
            )
            params[f.name] = inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[base]
            )
    return list(params.values())


def _without_none(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _default_text(options_cls: type, name: str) -> str:
    f = next(x for x in fields(options_cls) if x.name == name)
    value = f.default if f.default is not MISSING else None
    return "auto" if value is None else str(value)


def upcycle(
    model: Annotated[str, typer.Argument(help=f"Hub id, local folder, .gguf file, or alias ({', '.join(ALIASES)}).")] = DEFAULT_MODEL,
    to: Annotated[str, typer.Option("--to", help=f"Target variant: {', '.join(CONVERTERS)}.")] = "fine-moe",
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (written atomically).")] = Path("out/model"),
    dtype: Annotated[str, typer.Option(help="Output dtype: auto (the source's), float32, bfloat16, float16.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle .bin weights (read with weights_only=True).")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the source's custom config code to run.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    max_shard_size: Annotated[float, typer.Option(help="Largest output shard, in GB.")] = 5.0,
    **variant_options: Any,
) -> None:
    """Convert a dense checkpoint into a native transformers MoE (Mixtral, Qwen2-MoE, Qwen3-MoE)."""
    from sparsify.upcycle import upcycle as run_upcycle

    chosen = {k: v for k, v in variant_options.items() if v is not None}
    progress = Progress(
        TextColumn("[bold]writing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=err, transient=True,
    )
    task = progress.add_task("write", total=None)
    with progress:
        result = run_upcycle(
            model,
            to,
            output,
            dtype=dtype,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            revision=revision,
            max_shard_bytes=int(max_shard_size * 1e9),
            command=shlex.join(["sparsify", *sys.argv[1:]]),
            on_plan=lambda plan: progress.update(task, total=plan.nbytes),
            on_bytes=lambda n: progress.advance(task, n),
            **chosen,
        )
    from sparsify.info import layout_rows

    exact = result.plan.exactness
    table = Table(title=f"{to} from {model}", show_header=False)
    for key, value in [
        ("output", str(result.output)),
        ("architecture", result.plan.layout["architecture"]),
        *layout_rows(result.plan.layout),
        ("parameters", f"{result.params['total']:,} total, {result.params['active']:,} active"),
        ("reproduces teacher", ("[green]yes[/green]: " if exact.exact else "[yellow]no[/yellow]: ") + exact.reason),
        ("size", f"{result.plan.nbytes / 1e6:,.1f} MB in {result.seconds:.1f} s"),
    ]:
        table.add_row(key, value)
    out.print(table)


def _with_variant_options(command):
    """Replace `**variant_options` in the signature typer reads by one option per converter field."""
    signature = inspect.signature(command)
    extra = _variant_parameters()
    fixed = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = signature.replace(parameters=fixed + extra)
    command.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "variant_options"},
                               **{p.name: p.annotation for p in extra}}
    return command


_with_variant_options(upcycle)
app.command(help=upcycle.__doc__)(upcycle)


@app.command()
def info(folder: Annotated[Path, typer.Argument(help="A model folder (converted by sparsify or not).")]) -> None:
    """Variant, experts, granularity, total vs active parameters, and whether it is exact."""
    from sparsify.info import describe, layout_rows

    described = describe(folder)
    table = Table(title=str(folder), show_header=False)
    rows = [
        ("architecture", described.architecture),
        ("variant", described.variant),
        ("total parameters", f"{described.total_params:,}"),
        ("active parameters", f"{described.active_params:,} ({described.active_params / described.total_params:.1%})"),
    ]
    rows += layout_rows(described.layout)
    if described.exact is not None:
        verdict = "[green]yes[/green]" if described.exact["expected"] else "[yellow]no[/yellow]"
        rows.append(("reproduces teacher", f"{verdict}: {described.exact['reason']}"))
    if described.source:
        rows.append(("source", f"{described.source['ref']} ({described.source['kind']})"))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def main() -> None:
    import os

    # transformers' own warnings and progress bars would interleave with ours; keep the terminal to
    # sparsify's output unless the user asks for transformers' logs.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except SparsifyError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(1)
