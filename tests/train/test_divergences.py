"""--divergence: the total variation (speculative sampling's rejection chance) and the cross-entropy on
the teacher's top token (greedy acceptance) as the tie to the teacher, checked against brute force and
in a training run of a skip model's gates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import tiny_options

from sparsify.errors import SparsifyError
from sparsify.train import losses
from sparsify.upcycle import upcycle


def _pair(rows=300, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * 2, torch.randn(rows, vocab, generator=generator) * 2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_total_variation_is_the_chance_speculative_sampling_rejects_a_draft(temperature, monkeypatch):
    student, teacher = _pair()
    p, q = F.softmax(teacher / temperature, -1), F.softmax(student / temperature, -1)
    rejection = 1 - torch.minimum(p, q).sum(-1).mean()
    torch.testing.assert_close(losses.tvd_to_teacher(student, teacher, temperature), rejection, rtol=1e-5, atol=1e-6)
    assert losses.tvd_to_teacher(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    monkeypatch.setattr(losses, "CHUNK_TOKENS", 64)  # chunked, with gradients through the recomputed chunks
    leaf = student.clone().requires_grad_()
    chunked = losses.tvd_to_teacher(leaf, teacher, temperature)
    chunked.backward()
    reference = student.clone().requires_grad_()
    (0.5 * (F.softmax(teacher / temperature, -1) - F.softmax(reference / temperature, -1)).abs().sum(-1).mean()).backward()
    torch.testing.assert_close(chunked.detach(), rejection, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, reference.grad, rtol=1e-4, atol=1e-7)


def test_top1_cross_entropy_targets_the_teachers_most_likely_token():
    student, teacher = _pair(seed=1)
    expected = F.cross_entropy(student, teacher.argmax(-1))
    torch.testing.assert_close(losses.top1_ce_to_teacher(student, teacher), expected, rtol=1e-5, atol=1e-6)


def test_a_skip_model_trains_its_gates_against_the_rejection_chance(dense_models, corpus, tmp_path):
    from sparsify.train.loop import train

    converted = upcycle(str(dense_models["llama"]), "skip", tmp_path / "skip").output
    result = train(converted, tiny_options(corpus, lora_rank=0, target_skip=0.5, divergence="tvd"), output=tmp_path / "trained")
    assert all("tvd" in entry and "kl" in entry for entry in result.history)
    assert all(0 <= entry["tvd"] <= 1 for entry in result.history)


@pytest.mark.parametrize(("options", "message"), [
    (dict(divergence="js"), "--divergence must be one of kl, tvd, top1"),
    (dict(divergence="tvd", cache_teacher="/tmp/cache"), "--divergence tvd needs the teacher's forward pass every step"),
])
def test_bad_divergence_options_are_refused(corpus, options, message):
    from sparsify.train.options import DIVERGENCE_NAMES

    assert set(DIVERGENCE_NAMES) == set(losses.DIVERGENCES)  # the torch-free list names every loss
    with pytest.raises(SparsifyError, match=message):
        tiny_options(corpus, **options).validate()
