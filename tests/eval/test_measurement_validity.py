"""Timing that cannot be trusted is marked where it is taken and never shown as a speed-up.

Statistics are built from made-up run times (so the verdicts are exact), plus one real
`measure_speed` on a tiny random model to show that real measurements carry the verdict.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from support import build_dense
from sparsify.eval import cost
from sparsify.eval.cost import MAX_SPREAD, MIN_REPEATS, measure_speed, timing_stats
from sparsify.eval.report import embed_in_card, metric_rows, render_markdown
from sparsify.convert.skip.sweep import plot_points, plot_sweep, speedups, sweep_table


def _tokens_per_s(seconds: list[float], tokens: int = 100) -> dict:
    return timing_stats(seconds, lambda t: tokens / t)


VALID = [0.010, 0.011, 0.012]
UNSTABLE = [1.0, 1.0, 1.6]  # (1.6 - 1.0) / 1.0 = 60% > 50%
NOT_POSITIVE = [0.010, 0.0, -0.002]


def test_a_time_that_is_not_positive_is_invalid_and_gives_no_speed_at_all():
    stats = _tokens_per_s(NOT_POSITIVE)
    assert stats["valid"] is False and stats["problem"] == "invalid: 2 of 3 repeats gave a time that is not positive"
    assert stats["median"] is None and stats["min"] is None and stats["max"] is None  # not 1e9, not inf
    assert stats["seconds"] == NOT_POSITIVE and stats["repeats"] == 3


def test_fewer_than_three_repeats_are_flagged_but_keep_their_figures():
    assert MIN_REPEATS == 3
    for seconds in ([0.01], [0.01, 0.011]):
        stats = _tokens_per_s(seconds)
        assert stats["valid"] is False and stats["problem"].startswith("too few repeats: ")
        assert stats["median"] == pytest.approx(statistics.median(100 / t for t in seconds)) and stats["repeats"] == len(seconds)


def test_a_spread_beyond_half_the_median_is_unstable_and_half_exactly_is_not():
    assert MAX_SPREAD == 0.5
    stats = _tokens_per_s(UNSTABLE)
    assert stats["valid"] is False and stats["problem"] == "unstable: times spread 60% of their median (max-min; bound 50%)"
    assert stats["median"] == 100.0 and stats["min"] == pytest.approx(62.5) and stats["max"] == 100.0
    assert _tokens_per_s([1.0, 1.0, 1.5])["valid"] is True


def test_three_steady_repeats_are_a_result():
    stats = _tokens_per_s(VALID)
    assert stats["valid"] is True and stats["problem"] is None
    assert stats["median"] == pytest.approx(100 / 0.011)
    assert stats["min"] == pytest.approx(100 / 0.012) and stats["max"] == pytest.approx(10000)


def _fake_timings(monkeypatch, one_token: list[float], n_tokens: list[float], prefill: list[float]) -> None:
    """Replace the clock: `_timed` is called for prefill, the decode warm-up, then for each repeat
    one 1-token and one N-token generate; nothing is actually run."""
    answers = iter([prefill, [], *[[t] for pair in zip(one_token, n_tokens, strict=True) for t in pair]])
    monkeypatch.setattr(cost, "_timed", lambda run, device, warmup, repeats: next(answers))


def test_an_n_token_generate_no_slower_than_the_1_token_one_is_invalid_not_a_billion_tokens_per_second(monkeypatch):
    # The reported bug: a busy CPU made two N-token runs no slower than the fastest 1-token run;
    # the clamp turned that into a 0 ms step and 1e9 tokens/s.
    _fake_timings(monkeypatch, one_token=[0.020, 0.025, 0.021], n_tokens=[0.050, 0.020, 0.019], prefill=VALID)
    speed = measure_speed(nn.Linear(2, 2), torch.arange(64), batch_sizes=[1], prompt_len=8, decode_tokens=4, warmup=0,
                          repeats=3, pad_token_id=0)["batch_1"]
    for key in ("decode_tokens_per_s", "decode_ms_per_step"):
        assert speed[key]["valid"] is False and speed[key]["median"] is None and speed[key]["max"] is None
        assert speed[key]["problem"] == "invalid: 2 of 3 repeats gave a 4-token generate no slower than the fastest 1-token one"
        assert speed[key]["seconds"] == pytest.approx([0.010, 0.0, -0.001 / 3])  # (N-token - fastest 1-token) / 3
    assert speed["decode_generate_seconds"] == {"one_token": [0.020, 0.025, 0.021], "n_tokens": [0.050, 0.020, 0.019]}
    assert speed["prefill_tokens_per_s"]["valid"] is True and speed["prefill_tokens_per_s"]["median"] == pytest.approx(8 / 0.011)


def test_a_real_measurement_with_one_repeat_is_marked_too_few_repeats():
    model = build_dense("llama")
    speed = measure_speed(model, torch.arange(1, 200), batch_sizes=[1, 2], prompt_len=8, decode_tokens=8, warmup=1,
                          repeats=1, pad_token_id=0)
    for entry in speed.values():
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_step"):
            assert entry[key]["valid"] is False and entry[key]["problem"].startswith("too few repeats: 1,"), entry[key]
            assert entry[key]["repeats"] == len(entry[key]["seconds"]) == 1
        generated = entry["decode_generate_seconds"]
        assert entry["decode_ms_per_step"]["median"] == pytest.approx(1000 * (generated["n_tokens"][0] - generated["one_token"][0]) / 7)
        assert entry["prefill_tokens_per_s"]["median"] == pytest.approx(entry["batch"] * 8 / entry["prefill_tokens_per_s"]["seconds"][0])


def _speed(prefill: list[float], decode: list[float]) -> dict:
    return {"batch_1": {"batch": 1, "prompt_len": 8, "decode_engine": "hf", "prefill_tokens_per_s": _tokens_per_s(prefill, 8),
                        "decode_tokens_per_s": _tokens_per_s(decode, 1)}}


def _report(model_speed: dict, teacher_speed: dict) -> dict:
    params = {"total": 10, "active": 10}
    flops = {"context": 8, "total": 1e9}
    return {"model": {"name": "student"}, "teacher": {"name": "teacher"}, "device": "cpu", "created": "today",
            "settings": {}, "versions": {},
            "cost": {"model": {"params": params, "flops_per_token": flops, "speed": model_speed},
                     "teacher": {"params": params, "flops_per_token": flops, "speed": teacher_speed}}}


def _speed_rows(report: dict) -> dict:
    return {row.label.split(",")[0]: row for row in metric_rows(report) if "tokens/s" in row.label}


def test_a_speed_row_with_an_invalid_side_shows_the_reason_and_no_ratio():
    rows = _speed_rows(_report(_speed(prefill=[0.004] * 3, decode=NOT_POSITIVE), _speed(prefill=[0.001, 0.001, 0.0016], decode=VALID)))
    prefill, decode = rows["prefill tokens/s"], rows["decode tokens/s"]
    assert prefill.label == "prefill tokens/s, batch 1 (median, min-max)"
    assert prefill.show(prefill.model, "model") == "2,000 (2,000-2,000)"
    assert prefill.show(prefill.teacher, "teacher") == ("8,000 (5,000-8,000), unstable: times spread 60% of their median "
                                                         "(max-min; bound 50%)")
    assert prefill.show_change() == "n/a: teacher unstable"  # not x0.250
    assert decode.show(decode.model, "model") == "invalid: 2 of 3 repeats gave a time that is not positive"
    assert decode.show(decode.teacher, "teacher") == "90.9 (83.3-100.0)"
    assert decode.show_change() == "n/a: model invalid"


def test_one_repeat_on_each_side_gives_no_ratio_in_eval_compare_or_the_card(tmp_path):
    # The reported bug: `sparsify eval --repeats 1` showed a student prefilling 3.8x faster than its teacher.
    report = _report(_speed(prefill=[0.001], decode=[0.010]), _speed(prefill=[0.0038], decode=[0.010]))
    prefill = _speed_rows(report)["prefill tokens/s"]
    assert prefill.show_change() == "n/a: model and teacher too few repeats"
    # `sparsify compare` shows the model column as row.show(row.model): the label's min-max and the verdict too.
    assert prefill.show(prefill.model) == "8,000 (8,000-8,000), too few repeats: 1, fewer than 3 cannot show the spread"
    markdown = render_markdown(report)
    assert "x3.800" not in markdown and "| n/a: model and teacher too few repeats |" in markdown
    card = embed_in_card(tmp_path, report).read_text()
    assert "x3.800" not in card and "n/a: model and teacher too few repeats" in card


def test_steady_sides_still_get_their_ratio():
    rows = _speed_rows(_report(_speed(prefill=[0.001] * 3, decode=VALID), _speed(prefill=[0.002] * 3, decode=VALID)))
    assert rows["prefill tokens/s"].show_change() == "x2.000" and rows["decode tokens/s"].show_change() == "x1.000"


def test_card_sections_sit_one_level_below_its_evaluation_heading(tmp_path):
    report = _report(_speed([0.001] * 3, VALID), _speed([0.002] * 3, VALID))
    (tmp_path / "README.md").write_text("# student\n\nA model.\n")
    card = embed_in_card(tmp_path, report).read_text()
    headings = [line for line in card.splitlines() if line.startswith("#")]
    assert headings == ["# student", "## Evaluation", "### Cost"]
    report_headings = [line for line in render_markdown(report).splitlines() if line.startswith("#")]
    assert report_headings == ["# Evaluation of student", "## Cost"]


def _sweep(threshold_speeds: dict[float, dict], teacher_speed: dict) -> dict:
    result = {"windows": [64], "teacher_run": {"quality": {"64": {"perplexity": 10.0}}, "speed": teacher_speed}, "thresholds": []}
    for threshold, speed in threshold_speeds.items():
        entry = {"threshold": threshold, "quality": {"64": {"skip_rate": 0.25, "perplexity": 11.0, "perplexity_ratio": 1.1, "kl": 0.05}},
                 "speed": speed}
        entry["speedup"], entry["speedup_problems"] = speedups(speed, teacher_speed)
        result["thresholds"].append(entry)
    return result


def test_a_sweep_speedup_is_a_number_only_when_both_timings_are_results():
    result = _sweep({0.5: _speed(prefill=[0.001] * 3, decode=VALID), 0.9: _speed(prefill=[0.001] * 3, decode=NOT_POSITIVE)},
                    _speed(prefill=[0.002] * 3, decode=VALID))
    steady, broken = result["thresholds"]
    assert steady["speedup"] == {"batch_1_prefill": pytest.approx(2.0), "batch_1_decode": pytest.approx(1.0)}
    assert steady["speedup_problems"] == {}
    assert broken["speedup"] == {"batch_1_prefill": pytest.approx(2.0), "batch_1_decode": None}
    assert broken["speedup_problems"] == {"batch_1_decode": "model invalid: 2 of 3 repeats gave a time that is not positive"}
    columns, rows = sweep_table(result)
    assert columns == ["threshold", "skip rate", "perplexity", "vs teacher", "KL", "batch 1 prefill x", "batch 1 decode x"]
    assert rows == [["teacher", "0%", "10.000", "x1.000", "0", "1.00", "1.00"],
                    ["0.5", "25.0%", "11.000", "x1.100", "0.0500", "2.00", "1.00"],
                    ["0.9", "25.0%", "11.000", "x1.100", "0.0500", "2.00", "n/a (model invalid)"]]


def test_an_unstable_teacher_voids_every_speedup_it_divides_and_its_own_row(tmp_path):
    result = _sweep({0.5: _speed(prefill=[0.001] * 3, decode=VALID), 0.9: _speed(prefill=[0.001], decode=VALID)},
                    _speed(prefill=UNSTABLE, decode=VALID))
    _, rows = sweep_table(result)
    assert [row[-2] for row in rows] == ["n/a (teacher unstable)", "n/a (teacher unstable)",
                                         "n/a (model too few repeats, teacher unstable)"]
    assert [row[-1] for row in rows] == ["1.00", "1.00", "1.00"]
    points, left_out = plot_points(result)
    assert points == {"batch_1_decode": [(pytest.approx(1.0), 1.1, 0.5), (pytest.approx(1.0), 1.1, 0.9)]}
    assert left_out == {"threshold 0.5, batch 1 prefill": "n/a (teacher unstable)",
                        "threshold 0.9, batch 1 prefill": "n/a (model too few repeats, teacher unstable)"}
    note = plot_sweep(result, tmp_path / "sweep.png")
    assert note == ("left out 2 points, speed not a result: 1x n/a (teacher unstable), "
                    "1x n/a (model too few repeats, teacher unstable)")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert plot_sweep(_sweep({0.5: _speed([0.001] * 3, VALID)}, _speed([0.002] * 3, VALID)), tmp_path / "clean.png") is None
