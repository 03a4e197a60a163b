"""`sparsify skip-sweep`: quality, skip rate and speed of a skip model at several thresholds.

The model and its teacher are loaded once; for each inference threshold the held-out perplexity
(at every requested window, to see what context length does), the KL to the teacher, the skip
rate per sublayer and the measured prefill/decode speed are taken, and the teacher is measured
under the same harness. Writes sweep.json and the trade-off curve sweep.png. A speed-up is a ratio
of medians only where both timings are results (eval/cost.py's verdict); elsewhere it is None with
the reason in "speedup_problems", the table says "n/a (...)" and the plot leaves the point out.

With a freeze rule (convert/skip/freezing.py), each threshold first measures every gate's skip rate
on calibration text (by default the held-out text itself; pass other text, e.g. training data, to keep
the held-out numbers untouched by the choice) and fixes the gates that barely decide, so quality
and speed are those of the model as it would be served.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sparsify.convert.skip.describe import MODEL_TYPE
from sparsify.errors import SparsifyError
from sparsify.eval.options import EvalOptions
from sparsify.eval.quality import measure_quality
from sparsify.eval.report import why_no_ratio
from sparsify.eval.routing import measure_routing
from sparsify.eval.run import eval_text, load_for_eval, measure_model_speed, resolve_device
from sparsify.convert.skip.freezing import FreezeRule, freeze_gates
from sparsify.option_values import parse_count, parse_list


def skip_sweep(model_ref: str, thresholds: list[float], windows: list[int], options: EvalOptions, *, output: Path | None = None,
               freeze: FreezeRule | None = None, calibration_data: str | None = None,
               on_status: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    import torch

    if not options.teacher:
        raise SparsifyError("skip-sweep compares against the dense model: pass --teacher")
    if not options.data:
        raise SparsifyError("skip-sweep needs held-out text: pass --data")
    from sparsify.text_files import check_sources
    from sparsify.sources import check_model_ref

    options.validate()  # options, data files and both models are refused before either model loads
    if calibration_data:
        check_sources(parse_list(calibration_data), "--calibration-data")
    check_model_ref(model_ref)
    check_model_ref(options.teacher, "--teacher")
    config = Path(model_ref) / "config.json"
    if not config.exists() or json.loads(config.read_text()).get("model_type") != MODEL_TYPE:
        raise SparsifyError(f"{model_ref} is not a layer-skip model folder (make one with `sparsify upcycle ... --to skip`)")
    device = resolve_device(options.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_for_eval(model_ref, dtype, device)
    if not hasattr(model, "set_skip_threshold"):
        raise SparsifyError(f"{model_ref} is not a layer-skip model (make one with `sparsify upcycle ... --to skip`)")
    teacher, teacher_tokenizer = load_for_eval(options.teacher, dtype, device)
    text = eval_text(options, tokenizer)
    sample = text.ids[1:]
    calibration = eval_text(replace(options, data=calibration_data, tokens=options.routing_tokens), tokenizer) if calibration_data else text

    def quality_at(window: int, with_teacher: bool) -> dict[str, Any]:
        return measure_quality(model, text, window=window, stride=window // 2, batch_size=options.batch_size,
                               teacher=teacher if with_teacher else None)

    on_status("teacher")
    teacher_quality = {str(w): measure_quality(teacher, text, window=w, stride=w // 2, batch_size=options.batch_size)["model"] for w in windows}
    result: dict[str, Any] = {
        "model": model_ref, "teacher": options.teacher, "windows": windows, "device": str(device),
        "teacher_run": {"quality": teacher_quality, "speed": measure_model_speed(teacher, teacher_tokenizer, options, sample)},
        "thresholds": [],
    }
    if freeze is not None:
        result["freeze"] = {"open_below": freeze.open_below, "closed_above": freeze.closed_above,
                            "calibration": calibration_data or "the held-out text"}
    trained_threshold, saved_frozen = model.config.skip_threshold, dict(model.config.frozen_gates or {})
    for threshold in thresholds:
        on_status(f"threshold {threshold}")
        model.set_skip_threshold(threshold)
        entry: dict[str, Any] = {"threshold": threshold, "quality": {}}
        if freeze is not None:
            model.freeze_gates({})
            rates = measure_routing(model, calibration, block=min(windows), batch_size=options.batch_size,
                                    max_tokens=parse_count(options.routing_tokens))["skip"]["sublayers"]
            frozen = freeze_gates(model, rates, freeze)
            entry["calibration_skip_rate_by_gate"] = {f"{r['layer']}.{r['sublayer']}": r["skip_rate"] for r in rates}
            entry["frozen_gates"] = {"always_run": sum(frozen.values()), "always_skip": sum(not v for v in frozen.values()),
                                     "per_token": len(rates) - len(frozen)}
        for window in windows:
            quality = quality_at(window, with_teacher=True)
            entry["quality"][str(window)] = {
                **quality["model"], "kl": quality["vs_teacher"]["kl"], "top1_agreement": quality["vs_teacher"]["top1_agreement"],
                "perplexity_ratio": quality["model"]["perplexity"] / teacher_quality[str(window)]["perplexity"],
            }
            skip = measure_routing(model, text, block=window, batch_size=options.batch_size,
                                   max_tokens=parse_count(options.routing_tokens))["skip"]
            entry["quality"][str(window)]["skip_rate"] = skip["skip_rate"]
            entry["quality"][str(window)]["skip_rate_by_sublayer"] = skip["skip_rate_by_sublayer"]
            entry["quality"][str(window)]["skip_rate_by_gate"] = {f"{r['layer']}.{r['sublayer']}": r["skip_rate"] for r in skip["sublayers"]}
        entry["speed"] = measure_model_speed(model, tokenizer, options, sample)
        entry["speedup"], entry["speedup_problems"] = speedups(entry["speed"], result["teacher_run"]["speed"])
        result["thresholds"].append(entry)
    model.set_skip_threshold(trained_threshold)
    model.freeze_gates(saved_frozen)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        note = plot_sweep(result, output / "sweep.png")
        if note:
            result["notes"] = [*result.get("notes", []), note]
            (output / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _problem(stat: dict[str, Any] | None) -> str | None:
    """Why a timed statistic is not a result (eval/cost.py `timing_problem`), or None."""
    return "not measured" if stat is None else stat.get("problem")


def _tokens_per_s(speed: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The timed statistic behind the speed-up `key` ("<batch>_<kind>") in one side's speed results."""
    name, kind = key.rsplit("_", 1)
    return (speed.get(name) or {}).get(f"{kind}_tokens_per_s")


def _sides(speed: dict[str, Any], teacher_speed: dict[str, Any], key: str) -> dict[str, str]:
    """side -> problem, for the two measurements behind the speed-up `key`."""
    problems = {"model": _problem(_tokens_per_s(speed, key)), "teacher": _problem(_tokens_per_s(teacher_speed, key))}
    return {side: problem for side, problem in problems.items() if problem}


def speedups(speed: dict[str, Any], teacher_speed: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Model over teacher tokens/s per "<batch>_<kind>": a ratio of medians only where both
    measurements are valid; elsewhere None, with the reason under the same key in the second dict."""
    keys = [f"{name}_{kind}" for name, entry in speed.items() for kind in ("prefill", "decode") if f"{kind}_tokens_per_s" in entry]
    sides = {key: _sides(speed, teacher_speed, key) for key in keys}
    ratios = {key: None if sides[key] else _tokens_per_s(speed, key)["median"] / _tokens_per_s(teacher_speed, key)["median"]
              for key in keys}
    return ratios, {key: "; ".join(f"{side} {problem}" for side, problem in why.items()) for key, why in sides.items() if why}


def _not_a_result(sides: dict[str, str]) -> str:
    return f"n/a ({why_no_ratio(sides)})"


def _speedup_cell(entry: dict[str, Any], teacher_speed: dict[str, Any], key: str) -> str:
    ratio = entry["speedup"].get(key)
    return f"{ratio:.2f}" if ratio is not None else _not_a_result(_sides(entry["speed"], teacher_speed, key))


def _teacher_cell(teacher_speed: dict[str, Any], key: str) -> str:
    """The teacher against itself is 1.00 by definition, but only if its own timing is a result."""
    problem = _problem(_tokens_per_s(teacher_speed, key))
    return _not_a_result({"teacher": problem}) if problem else "1.00"


def sweep_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Column headers and string rows of the table `sparsify skip-sweep` prints: the teacher first,
    then one row per threshold, perplexity at the last window. A speed-up that is not a result reads
    "n/a (model unstable)" and the like (the full reason is in sweep.json), never a number."""
    window = str(result["windows"][-1])
    teacher_speed = result["teacher_run"]["speed"]
    speed_keys = list(result["thresholds"][0]["speedup"]) if result["thresholds"] else []
    frozen = "freeze" in result
    columns = ["threshold", "skip rate", *(["gates run/skip/decide"] if frozen else []), "perplexity", "vs teacher", "KL",
               *[k.replace("_", " ") + " x" for k in speed_keys]]
    teacher_ppl = result["teacher_run"]["quality"][window]["perplexity"]
    rows = [["teacher", "0%", *(["-"] if frozen else []), f"{teacher_ppl:.3f}", "x1.000", "0",
             *[_teacher_cell(teacher_speed, k) for k in speed_keys]]]
    for entry in result["thresholds"]:
        quality = entry["quality"][window]
        gates = entry.get("frozen_gates")
        rows.append([f"{entry['threshold']:g}", f"{quality['skip_rate']:.1%}",
                     *([f"{gates['always_run']}/{gates['always_skip']}/{gates['per_token']}"] if frozen else []),
                     f"{quality['perplexity']:.3f}", f"x{quality['perplexity_ratio']:.3f}", f"{quality['kl']:.4f}",
                     *[_speedup_cell(entry, teacher_speed, k) for k in speed_keys]])
    return columns, rows


def plot_points(result: dict[str, Any]) -> tuple[dict[str, list[tuple[float, float, float]]], dict[str, str]]:
    """What sweep.png draws: per "<batch>_<kind>" the (speed-up, perplexity ratio at the last window,
    threshold) points whose speed-up is a result; and the points left out with why, e.g.
    {"threshold 0.5, batch 1 decode": "n/a (model unstable)"}."""
    window = str(result["windows"][-1])
    teacher_speed = result["teacher_run"]["speed"]
    points: dict[str, list[tuple[float, float, float]]] = {}
    left_out: dict[str, str] = {}
    for entry in result["thresholds"]:
        for key, ratio in entry["speedup"].items():
            if ratio is None:
                point = f"threshold {entry['threshold']:g}, {key.replace('_', ' ')}"
                left_out[point] = _not_a_result(_sides(entry["speed"], teacher_speed, key))
            else:
                points.setdefault(key, []).append((ratio, entry["quality"][window]["perplexity_ratio"], entry["threshold"]))
    return points, left_out


def _left_out_note(left_out: dict[str, str]) -> str:
    """e.g. "left out 3 points, speed not a result: 2x n/a (model too few repeats), 1x n/a (teacher unstable)"."""
    reasons = Counter(left_out.values())
    return f"left out {len(left_out)} point{'s' * (len(left_out) != 1)}, speed not a result: " + \
        ", ".join(f"{count}x {reason}" for reason, count in reasons.items())


def plot_sweep(result: dict[str, Any], path: Path) -> str | None:
    """Write the trade-off curve to `path` (if matplotlib is there). Points whose speed-up is not a
    result are not drawn; the figure's title says how many and why, and so does the returned note
    (None when every point was drawn)."""
    points, left_out = plot_points(result)
    note = _left_out_note(left_out) if left_out else None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return note
    window = str(result["windows"][-1])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, kind in zip(axes, ("decode", "prefill"), strict=True):
        for batch in result["teacher_run"]["speed"]:
            series = points.get(f"{batch}_{kind}")
            if not series:
                continue
            axis.plot([p[0] for p in series], [p[1] for p in series], marker="o", label=batch.replace("_", " "))
            for x, y, threshold in series:
                axis.annotate(f"{threshold:g}", (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if not any(points.get(f"{batch}_{kind}") for batch in result["teacher_run"]["speed"]):
            axis.text(0.5, 0.5, f"no {kind} speed-up is a result", ha="center", transform=axis.transAxes)
        axis.axvline(1.0, color="grey", linewidth=0.8)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xlabel(f"{kind} speed vs teacher")
        axis.set_ylabel(f"perplexity vs teacher (window {window}, log)")
        axis.set_yscale("log")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    title = "skip threshold trade-off (labels: threshold)"
    figure.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return note
