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
    return _chunked_kl(_kl_sum, student_logits.reshape(-1, vocab), (teacher_logits.reshape(-1, vocab),), temperature)


def _kl_top_k_sum(student: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    p = logprobs.exp()
    kept = (p * (logprobs - log_q.gather(-1, ids))).sum()
    # log q(tail) from the student's logits outside the top-k, not log(1 - sum q): stable as the tail
    # vanishes. A finite floor instead of -inf keeps the gradient finite where k covers the vocabulary.
    log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, -1e30), dim=-1)
    has_tail = tail > 0
    safe_tail = torch.where(has_tail, tail, torch.ones_like(tail))
    return kept + torch.where(has_tail, safe_tail * (safe_tail.log() - log_q_tail), torch.zeros_like(tail)).sum()


def kl_to_top_k(student_logits: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """`kl_to_teacher` against stored teacher targets (sparsify/train/teacher_cache.py): the teacher's
    top-k log-probabilities at T, their ids, and the mass r of the other tokens, taken as one outcome:
    sum_topk p (log p - log q) + r (log r - log q_tail). Equal to `kl_to_teacher` where k covers the vocabulary."""
    vocab, k = student_logits.shape[-1], ids.shape[-1]
    targets = (logprobs.reshape(-1, k), ids.reshape(-1, k), tail.reshape(-1))
    return _chunked_kl(_kl_top_k_sum, student_logits.reshape(-1, vocab), targets, temperature)


def _chunked_kl(kl_sum, student: torch.Tensor, targets: tuple[torch.Tensor, ...], temperature: float) -> torch.Tensor:
    """Mean over tokens of `kl_sum(student rows, target rows..., T)` times T^2, CHUNK_TOKENS rows at a time,
    each chunk recomputed in the backward pass."""
    return _chunked_mean(kl_sum, student, targets, temperature) * temperature**2


def _chunked_mean(row_sum, student: torch.Tensor, targets: tuple[torch.Tensor, ...], temperature: float) -> torch.Tensor:
    """Mean over tokens of `row_sum(student rows, target rows..., T)`, CHUNK_TOKENS rows at a time."""
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, student.shape[0], CHUNK_TOKENS):
        chunk = slice(start, start + CHUNK_TOKENS)
        pieces = (student[chunk], *(target[chunk] for target in targets), temperature)
        if student.requires_grad:
            total = total + checkpoint(row_sum, *pieces, use_reentrant=False)
        else:
            total = total + row_sum(*pieces)
    return total / student.shape[0]


def _tvd_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    q = F.softmax(student.float() / temperature, dim=-1)
    p = F.softmax(teacher.float() / temperature, dim=-1)
    return (p - q).abs().sum() / 2


def tvd_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of the total variation between the teacher's and the student's distributions at T:
    1 - sum min(p, q), the chance that speculative sampling rejects a token the student drafted."""
    vocab = student_logits.shape[-1]
    return _chunked_mean(_tvd_sum, student_logits.reshape(-1, vocab), (teacher_logits.reshape(-1, vocab),), temperature)


def _top1_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.cross_entropy(student.float() / temperature, teacher.argmax(-1), reduction="sum")


def top1_ce_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of the student's cross-entropy on the teacher's most likely token: what greedy
    speculative decoding accepts (the student's argmax must be the teacher's), made differentiable."""
    vocab = student_logits.shape[-1]
    return _chunked_mean(_top1_sum, student_logits.reshape(-1, vocab), (teacher_logits.reshape(-1, vocab),), temperature)


# --divergence: the loss that ties the student to its teacher, and the name it is logged under.
DIVERGENCES = {"kl": ("kl", kl_to_teacher), "tvd": ("tvd", tvd_to_teacher), "top1": ("top1_ce", top1_ce_to_teacher)}


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting ids[t+1] from position t (the language-modelling loss)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
