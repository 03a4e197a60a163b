"""Training losses as plain functions. Everything here runs in fp32, whatever the model dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student) at temperature T, times T^2 (Hinton et al.)
    so that gradients keep their scale as T changes."""
    vocab = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting ids[t+1] from position t (the language-modelling loss)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss, averaged over layers: E * sum_e f_e * P_e, where f_e is the
    fraction of top-k assignments that go to expert e and P_e its mean router probability.
    It is 1 for perfectly uniform routing and grows with imbalance."""
    losses = []
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        fraction = F.one_hot(chosen, experts).float().sum(dim=(0, 1)) / chosen.numel()
        losses.append(experts * (fraction * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition of the router logits; keeps them small and stable."""
    return torch.stack([torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits in router_logits]).mean()


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
