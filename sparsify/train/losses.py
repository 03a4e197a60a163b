"""Training losses as plain functions. Everything here runs in fp32, whatever the model dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Tokens per chunk of the full-vocabulary losses: fp32 intermediates of chunk x vocab instead of
# tokens x vocab (16k tokens x 49k vocab would be 3.2 GB per intermediate).
CHUNK_TOKENS = 2048


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student) at temperature T, times T^2 (Hinton et al.)
    so that gradients keep their scale as T changes. Computed in chunks of tokens, each
    recomputed in the backward pass, so the fp32 intermediates never span the whole batch."""
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, student.shape[0], CHUNK_TOKENS):
        pieces = (student[start : start + CHUNK_TOKENS], teacher[start : start + CHUNK_TOKENS], temperature)
        if student.requires_grad:
            total = total + checkpoint(_kl_sum, *pieces, use_reentrant=False)
        else:
            total = total + _kl_sum(*pieces)
    return total / student.shape[0] * temperature**2


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting ids[t+1] from position t (the language-modelling loss)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
