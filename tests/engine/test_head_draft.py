"""Speculative decoding with a draft head on the static-cache engine: the tokens are the teacher's
greedy tokens whatever the head drafts (dense and skip models, batch 1 and 2, one and several drafts
per round); the rounds accept exactly what the head's training-time chains (draft_head.run_chains)
predict, so the numbers a training run reports are the ones decoding gets; the cache the rounds leave
is the teacher's. On CPU the round runs eagerly; the captured round is checked on a GPU."""

from __future__ import annotations

import pytest
import torch
from support import IDS, build_dense, randomise_gates, reference_decode
from transformers import AutoModelForCausalLM

from sparsify.convert.skip.draft_head import DraftHead, draft_logits, run_chains
from sparsify.convert.skip.draft_head_training import teacher_targets
from sparsify.convert.skip.draft_plan import DraftPlan, drafting
from sparsify.engine.graph_decode import graphs_supported
from sparsify.engine.speculative_decode import SpeculativeDecoder, time_speculative_decode
from sparsify.upcycle import upcycle


@pytest.fixture(scope="module")
def dense():
    models = {family: build_dense(family).eval() for family in ("llama", "qwen3")}
    for model in models.values():
        model.requires_grad_(False)
    return models


def _greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return reference_decode(model, prompt, steps=new_tokens - 1)[0]


def _repeating_head(model, feature_layers: list[int] | None = None) -> DraftHead:
    """A head that drafts well on these random models: nudged so its fuse passes the token's
    embedding through (their greedy text repeats one token for stretches). Reading several layers,
    its reduce gives the lower ones a share, so that they matter."""
    head = DraftHead(model, feature_layers=feature_layers)
    with torch.no_grad():
        head.fuse.weight[:, : model.config.hidden_size].mul_(0.1)
        if head.reduce is not None:
            width = model.config.hidden_size
            head.reduce.weight[:, :width].copy_(0.5 * torch.eye(width))
    return head


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_a_draft_head_gives_the_teachers_greedy_tokens(dense, family, draft_tokens):
    model = dense[family]
    for head in (DraftHead(model), _repeating_head(model), _repeating_head(model, [0]), _repeating_head(model, [0, 1])):
        for prompt in (IDS[:1, :6], IDS[:, :5]):  # batch 1 and batch 2
            result = SpeculativeDecoder(model, prompt.shape[0], 24, None, draft_tokens, use_graph=False, head=head).generate(prompt, 14)
            assert result.sequences.tolist() == _greedy(model, prompt, 14).tolist()
            assert 13 / (draft_tokens + 1) <= result.stats.rounds <= 13


@pytest.mark.parametrize("feature_layers", [None, [0, 1]], ids=["top layer", "every layer (EAGLE-3)"])
def test_the_rounds_accept_what_the_heads_chains_predict(dense, feature_layers):
    """Round by round, the drafts accepted are the leading matches of the chain that starts there,
    as run_chains computes it on the teacher's own text (the text runs k tokens past the end, where a
    last round may still accept)."""
    model = dense["llama"]
    head = _repeating_head(model, feature_layers)
    prompt, new_tokens = IDS[:1, :6], 24
    for k in (1, 2, 4):
        text = _greedy(model, prompt, new_tokens + k)
        targets = teacher_targets(model, text, head.read_layers)
        greedy = targets.greedy
        with torch.no_grad():
            drafted = [draft_logits(model, out).argmax(-1)[0] for out in run_chains(head, model, targets.states, text, k)]
        expected, start = [0] * (k + 1), prompt.shape[1]
        while start + 1 - prompt.shape[1] < new_tokens:
            accepted = 0
            while accepted < k and drafted[accepted][start] == greedy[0, start + accepted]:
                accepted += 1
            expected[accepted] += 1
            start += accepted + 1
        result = SpeculativeDecoder(model, 1, 40, None, k, use_graph=False, head=head).generate(prompt, new_tokens)
        assert result.stats.accepted_histogram == expected
        assert sum(expected[1:]) > 0  # the head drafts something right, so the check has teeth


def test_a_skip_model_drafts_with_its_head_and_verifies_with_every_gate_open(dense_weights, tmp_path):
    folder = upcycle(str(dense_weights["llama"]), "skip", tmp_path / "skip").output
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    randomise_gates(model, 3)
    head = _repeating_head(model)
    prompt = IDS[:1, :6]
    with drafting(model, DraftPlan()):
        expected = _greedy(model, prompt, 16)
    decoder = SpeculativeDecoder(model, 1, 30, DraftPlan.per_token(0.5), 2, use_graph=False, head=head)
    result = decoder.generate(prompt, 16)
    assert result.sequences.tolist() == expected.tolist()
    assert all(gate.forced is None for _, _, gate in model.skip_gates())  # restored
    filled = int(decoder.draft.position)
    with torch.no_grad(), drafting(model, DraftPlan()):
        out = model(input_ids=result.sequences[:, :filled], use_cache=True)
    for index, layer in enumerate(out.past_key_values.layers):  # the teacher's cache, whatever the head drafted
        torch.testing.assert_close(decoder.draft.keys[index][:, :, :filled], layer.keys, rtol=0, atol=1e-5)


def test_timing_a_head_reports_its_rounds(dense):
    model = dense["llama"]
    timing = time_speculative_decode(model, IDS[:1, :6], 10, None, 2, warmup=1, repeats=2, use_graph=False, head=_repeating_head(model))
    assert len(timing.seconds_per_token) == 2 and timing.stats.rounds >= 1 and timing.stats.acceptance_rate > 0


@pytest.mark.skipif(not graphs_supported(), reason="needs a GPU and nvcc for the graph engine's kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_head_rounds_decode_like_eager_rounds_on_gpu(dtype):
    model = build_dense("llama").eval().to("cuda", dtype)
    head = _repeating_head(model, [0, 1])
    prompt = IDS[:, :6].cuda()
    for k in (1, 3):
        eager = SpeculativeDecoder(model, 2, 40, None, k, use_graph=False, head=head).generate(prompt, 24)
        decoder = SpeculativeDecoder(model, 2, 40, None, k, use_graph=True, head=head)
        graph = decoder.generate(prompt, 24)
        assert graph.sequences.tolist() == eager.sequences.tolist()
        assert graph.stats.accepted_histogram == eager.stats.accepted_histogram
        again = decoder.generate(IDS[:, 1:7].cuda(), 24)  # the captured round reused for another prompt
        assert again.sequences.tolist() == SpeculativeDecoder(model, 2, 40, None, k, use_graph=False, head=head).generate(
            IDS[:, 1:7].cuda(), 24).sequences.tolist()
        if dtype == torch.float32:
            assert graph.sequences.tolist() == _greedy(model, prompt, 24).tolist()


def test_eval_times_a_dense_model_drafting_with_its_head(dense_models, tmp_path):
    """`sparsify eval --decode-engine speculative` on a dense folder with draft_head/: the head drafts,
    the report names it; --draft gates on a dense model is refused in one line."""
    import shutil

    from sparsify.errors import SparsifyError
    from sparsify.eval.options import EvalOptions
    from sparsify.eval.report import metric_rows
    from sparsify.eval.run import evaluate

    folder = tmp_path / "with-head"
    shutil.copytree(dense_models["llama"], folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    _repeating_head(model).save(folder / "draft_head")
    options = EvalOptions(teacher=str(dense_models["llama"]), suite="cost", speed_batch="1", prompt_len=6, decode_tokens=8,
                          decode_engine="speculative", draft_tokens=2, repeats=1, device="cpu")
    report = evaluate(str(folder), options)
    mine = report["cost"]["model"]["speed"]["batch_1"]
    drafted = mine["decode_speculative"]
    assert mine["decode_engine"] == "speculative (static cache, eager)" and drafted["draft"].startswith("draft head (1 layer, from layer 1")
    assert drafted["draft_tokens"] == 2 and 0 <= drafted["acceptance_rate"] <= 1 and "plan" not in drafted
    assert any(row.label.startswith("speculative: drafts accepted, batch 1 (draft head") for row in metric_rows(report))
    with pytest.raises(SparsifyError, match="this model has none"):
        evaluate(str(folder), EvalOptions(**{**options.__dict__, "draft": "gates"}))
