"""Perplexity and bits per byte over a sliding window, and agreement with the teacher.

Both models see the same windows; at every scored position we add the model's log-loss, the
teacher's, KL(teacher || model) and whether their top-1 tokens agree. Sums are kept in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sparsify.eval.text import EvalText, windows

SUMS = ("model_nll", "teacher_nll", "kl", "top1", "tokens")


def measure_quality(
    model, text: EvalText, *, window: int, stride: int, batch_size: int, teacher=None,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, Any]:
    device = next(model.parameters()).device
    spans = windows(len(text.ids), window, stride)
    sums = dict.fromkeys(SUMS, 0.0)
    for start in range(0, len(spans), batch_size):
        batch = spans[start:start + batch_size]
        for group in _same_length(batch):
            ids = torch.stack([text.ids[b:e] for b, e, _ in group]).to(device)
            with torch.no_grad():
                logits = model(input_ids=ids).logits
                teacher_logits = teacher(input_ids=ids).logits if teacher is not None else None
            for row, (begin, end, first) in enumerate(group):
                positions = torch.arange(first, end)
                positions = positions[text.is_target[positions]]
                if len(positions) == 0:
                    continue
                _add(sums, logits[row], None if teacher_logits is None else teacher_logits[row], positions - begin, text.ids[positions].to(device))
        on_progress(min(start + batch_size, len(spans)), len(spans))
    return _summarise(sums, text, teacher is not None, window, stride)


def _same_length(spans: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    groups: dict[int, list] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    return list(groups.values())


def _add(sums: dict[str, float], logits: torch.Tensor, teacher_logits: torch.Tensor | None, at: torch.Tensor, targets: torch.Tensor) -> None:
    """Score the tokens at window offsets `at` (predicted by the logits one position earlier)."""
    log_probs = F.log_softmax(logits[at - 1].float(), dim=-1)
    sums["model_nll"] += -log_probs.gather(-1, targets[:, None]).double().sum().item()
    sums["tokens"] += len(at)
    if teacher_logits is None:
        return
    teacher_log_probs = F.log_softmax(teacher_logits[at - 1].float(), dim=-1)
    sums["teacher_nll"] += -teacher_log_probs.gather(-1, targets[:, None]).double().sum().item()
    sums["kl"] += (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum(-1).double().sum().item()
    sums["top1"] += (teacher_log_probs.argmax(-1) == log_probs.argmax(-1)).sum().item()


def _scores(nll_sum: float, tokens: int, num_bytes: int) -> dict[str, float]:
    return {
        "perplexity": math.exp(nll_sum / tokens),
        "nll_per_token": nll_sum / tokens,
        "bits_per_byte": nll_sum / math.log(2) / num_bytes,
    }


def _summarise(sums: dict[str, float], text: EvalText, with_teacher: bool, window: int, stride: int) -> dict[str, Any]:
    tokens = int(sums["tokens"])
    result: dict[str, Any] = {
        "tokens": tokens, "bytes": text.num_bytes, "documents": text.num_documents, "window": window, "stride": stride,
        "model": _scores(sums["model_nll"], tokens, text.num_bytes),
    }
    if with_teacher:
        result["teacher"] = _scores(sums["teacher_nll"], tokens, text.num_bytes)
        result["vs_teacher"] = {"kl": sums["kl"] / tokens, "top1_agreement": sums["top1"] / tokens}
    return result
