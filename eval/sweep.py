"""`sparsify skip-sweep`: quality, skip rate and speed of a skip model at several thresholds.

The model and its teacher are loaded once; for each inference threshold the held-out perplexity
(at every requested window, to see what context length does), the KL to the teacher, the skip
rate per sublayer and the measured prefill/decode speed are taken, and the teacher is measured
under the same harness. Writes sweep.json and the trade-off curve sweep.png.

With a freeze rule (sparsify.skip.freezing), each threshold first measures every gate's skip rate
on calibration text (by default the held-out text itself; pass other text, e.g. training data, to keep
the held-out numbers untouched by the choice) and fixes the gates that barely decide, so quality
and speed are those of the model as it would be served.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sparsify.errors import SparsifyError
from sparsify.eval.options import EvalOptions
from sparsify.eval.quality import measure_quality
from sparsify.eval.routing import measure_routing
from sparsify.eval.run import eval_text, load_for_eval, measure_model_speed, resolve_device
from sparsify.skip.freezing import FreezeRule, freeze_gates
from sparsify.train.options import parse_count


def skip_sweep(model_ref: str, thresholds: list[float], windows: list[int], options: EvalOptions, *, output: Path | None = None,
               freeze: FreezeRule | None = None, calibration_data: str | None = None,
               on_status: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    import torch

    if not options.teacher:
        raise SparsifyError("skip-sweep compares against the dense model: pass --teacher")
    if not options.data:
        raise SparsifyError("skip-sweep needs held-out text: pass --data")
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
        entry["speedup"] = {
            f"{name}_{kind}": entry["speed"][name][f"{kind}_tokens_per_s"]["median"] / result["teacher_run"]["speed"][name][f"{kind}_tokens_per_s"]["median"]
            for name in entry["speed"] for kind in ("prefill", "decode") if f"{kind}_tokens_per_s" in entry["speed"][name]
        }
        result["thresholds"].append(entry)
    model.set_skip_threshold(trained_threshold)
    model.freeze_gates(saved_frozen)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        _plot(result, output / "sweep.png")
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    window = str(result["windows"][-1])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, kind in zip(axes, ("decode", "prefill"), strict=True):
        for batch in result["teacher_run"]["speed"]:
            key = f"{batch}_{kind}"
            points = [(e["speedup"][key], e["quality"][window]["perplexity_ratio"], e["threshold"]) for e in result["thresholds"] if key in e["speedup"]]
            if not points:
                continue
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=batch.replace("_", " "))
            for x, y, threshold in points:
                axis.annotate(f"{threshold:g}", (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        axis.axvline(1.0, color="grey", linewidth=0.8)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xlabel(f"{kind} speed vs teacher")
        axis.set_ylabel(f"perplexity vs teacher (window {window}, log)")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    figure.suptitle("skip threshold trade-off (labels: threshold)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
