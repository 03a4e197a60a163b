"""Self-speculative decoding on the static-cache engine: whatever the draft plan (per-token gates,
static skips with no K/V written, everything skipped), the tokens are the dense teacher's greedy
tokens, at batch 1 and batch 2; the cache the rounds leave behind is the teacher's; draft plans
survive a save and load. On CPU the round runs eagerly; the captured round is checked on a GPU."""

from __future__ import annotations

import pytest
import torch
from support import IDS, engine_decode, randomise_gates, reference_decode
from transformers import AutoModelForCausalLM

from sparsify.convert.skip.draft_plan import DraftPlan, drafting
from sparsify.convert.skip.speculative import speculative_generate
from sparsify.engine.graph_decode import graphs_supported
from sparsify.engine.speculative_decode import SpeculativeDecoder, time_speculative_decode
from sparsify.errors import SparsifyError
from sparsify.upcycle import upcycle


@pytest.fixture(scope="module")
def skip_folders(dense_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("skip-spec-engine")
    return {family: upcycle(str(dense_weights[family]), "skip", folder / family).output for family in ("llama", "qwen3")}


def _skip_model(folder, seed=0):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    randomise_gates(model, seed)
    return model


def _teacher_greedy(dense_folder, prompt: torch.Tensor, new_tokens: int) -> list[list[int]]:
    teacher = AutoModelForCausalLM.from_pretrained(dense_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ids, _ = reference_decode(teacher, prompt, steps=new_tokens - 1)
    return ids[:, prompt.shape[1]:].tolist()


def _plans(model) -> dict[str, DraftPlan]:
    keys = [f"{layer}.{sublayer}" for layer, sublayer, _ in model.skip_gates()]
    return {"per-token": DraftPlan.per_token(0.5), "static half": DraftPlan(tuple(keys[::2])),
            "half, rest per token": DraftPlan(tuple(keys[1::2]), gated=True, threshold=0.6), "everything skipped": DraftPlan(tuple(keys))}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_every_plan_gives_the_teachers_greedy_tokens_at_batch_1(skip_folders, dense_weights, family, draft_tokens):
    model = _skip_model(skip_folders[family])
    prompt = IDS[:1, :6]
    expected = _teacher_greedy(dense_weights[family], prompt, 14)
    for name, plan in _plans(model).items():
        result = SpeculativeDecoder(model, 1, 20, plan, draft_tokens, use_graph=False).generate(prompt, 14)
        assert result.sequences[:, :6].tolist() == prompt.tolist()
        assert result.sequences[:, 6:].tolist() == expected, name
        stats = result.stats
        assert sum(stats.accepted_histogram) == stats.rounds >= 1 and 0 <= stats.acceptance_rate <= 1
        # 14 tokens: the prefill's, then 1 to k + 1 per round
        assert 13 / (draft_tokens + 1) <= stats.rounds <= 13
    assert all(gate.forced is None and gate.threshold == 0.5 for _, _, gate in model.skip_gates())  # restored


def test_static_plan_accepts_what_the_transformers_path_accepts(skip_folders):
    """Same drafts whether or not skipped attention writes K/V: nothing reads them."""
    model = _skip_model(skip_folders["llama"], seed=2)
    plan = _plans(model)["static half"]
    prompt = IDS[:1, :7]
    engine = SpeculativeDecoder(model, 1, 24, plan, 2, use_graph=False).generate(prompt, 16)
    with drafting(model, DraftPlan(plan.skip, gated=True)):  # statically skipped gates are forced closed, the rest ...
        for _, _, gate in model.skip_gates():
            gate.forced = False if gate.forced is False else True  # ... run: the static plan through the transformers path
        plain = speculative_generate(model, prompt, max_new_tokens=16, draft_tokens=2)
    assert engine.sequences.tolist() == plain.sequences.tolist()
    assert engine.stats.accepted_histogram == plain.stats.accepted_histogram


def test_batch_rounds_keep_the_fewest_accepted_and_every_row_gets_its_own_teacher_tokens(skip_folders, dense_weights):
    model = _skip_model(skip_folders["llama"], seed=1)
    prompt = IDS[:, :6]
    result = SpeculativeDecoder(model, 2, 24, _plans(model)["per-token"], 3, use_graph=False).generate(prompt, 16)
    assert result.sequences[:, 6:].tolist() == _teacher_greedy(dense_weights["llama"], prompt, 16)
    assert result.stats.row_acceptance_rate >= result.stats.acceptance_rate


def test_the_cache_after_decoding_is_the_teachers(skip_folders):
    model = _skip_model(skip_folders["qwen3"], seed=4)
    decoder = SpeculativeDecoder(model, 1, 20, _plans(model)["static half"], 3, use_graph=False)
    result = decoder.generate(IDS[:1, :5], 12)
    engine = decoder.draft
    filled = int(engine.position)  # slots [0, position) hold K/V; the token at `position` is not fed yet
    with torch.no_grad(), drafting(model, DraftPlan()):
        out = model(input_ids=result.sequences[:, :filled], use_cache=True)
    for index, layer in enumerate(out.past_key_values.layers):
        torch.testing.assert_close(engine.keys[index][:, :, :filled], layer.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(engine.values[index][:, :, :filled], layer.values, rtol=0, atol=1e-5)


def test_end_token_stops_and_pads(skip_folders, dense_weights):
    model = _skip_model(skip_folders["llama"])
    prompt = IDS[:1, :6]
    expected = _teacher_greedy(dense_weights["llama"], prompt, 10)[0]
    stop = expected[4]
    first = expected.index(stop)
    result = SpeculativeDecoder(model, 1, 20, _plans(model)["static half"], 2, use_graph=False).generate(
        prompt, 10, eos_token_id=[stop], pad_token_id=-1)
    assert result.sequences[0, 6:].tolist() == expected[: first + 1] + [-1] * (9 - first)


def test_draft_plans_survive_save_and_load_and_bad_plans_are_refused(skip_folders, tmp_path):
    model = _skip_model(skip_folders["llama"])
    plan = DraftPlan(("0.attention", "1.ffn"), chosen_by={"tune_agreement": 0.9})
    plan.save_to(model)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert DraftPlan.of_model(loaded) == plan and DraftPlan.of_model(loaded).chosen_by == {"tune_agreement": 0.9}
    with pytest.raises(SparsifyError, match="LAYER.attention"):
        DraftPlan(("0.mlp",))
    with pytest.raises(SparsifyError, match="does not gate"):
        with drafting(model, DraftPlan(("99.ffn",))):
            pass


def test_timing_reports_a_speed_and_the_rounds(skip_folders):
    model = _skip_model(skip_folders["llama"])
    timing = time_speculative_decode(model, IDS[:1, :6], 8, _plans(model)["static half"], 2, warmup=1, repeats=2, use_graph=False)
    assert len(timing.seconds_per_token) == 2 and all(s > 0 for s in timing.seconds_per_token)
    assert timing.stats.rounds >= 1 and not timing.use_graph


@pytest.mark.skipif(not graphs_supported(), reason="needs a GPU and nvcc for the graph engine's kernels")
@pytest.mark.parametrize("plan_name", ["per-token", "static half", "everything skipped"])
def test_captured_rounds_decode_like_eager_rounds(skip_folders, plan_name):
    model = _skip_model(skip_folders["llama"]).cuda()
    plan = _plans(model)[plan_name]
    prompt = IDS[:, :6].cuda()
    eager = SpeculativeDecoder(model, 2, 30, plan, 3, use_graph=False).generate(prompt, 20)
    decoder = SpeculativeDecoder(model, 2, 30, plan, 3, use_graph=True)
    graph = decoder.generate(prompt, 20)
    assert graph.sequences.tolist() == eager.sequences.tolist()
    assert graph.stats.accepted_histogram == eager.stats.accepted_histogram
    other = IDS[:, 1:7].cuda()  # the captured round reused for another prompt, as timing and the bench do
    assert decoder.generate(other, 20).sequences.tolist() == SpeculativeDecoder(model, 2, 30, plan, 3, use_graph=False).generate(other, 20).sequences.tolist()


def test_plan_search_drops_greedily_by_agreement_with_the_teacher(skip_folders):
    from sparsify.convert.skip.draft_search import _scores, search_draft_plan

    model = _skip_model(skip_folders["llama"])
    gated = len(model.skip_gates())
    search = search_draft_plan(model, [IDS], max_share=0.5)
    assert [len(step.skip) for step in search.steps] == list(range(round(gated * 0.5) + 1))
    assert search.steps[0].agreement == 1.0 and search.steps[0].kl == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad(), drafting(model, DraftPlan()):
        logits = model(input_ids=IDS).logits.float().log_softmax(-1)
    singles = {f"{layer}.{sublayer}": _scores(model, [IDS], [(logits.argmax(-1), logits)], (f"{layer}.{sublayer}",))
               for layer, sublayer, _ in model.skip_gates()}
    assert search.steps[1].agreement == max(agreement for agreement, _ in singles.values())  # the best single drop first
    plan = search.plan_for(0.25)
    assert plan.skip == search.steps[round(gated * 0.25)].skip and not plan.gated
    assert plan.chosen_by["tune_tokens"] == IDS.numel()
    with pytest.raises(SparsifyError, match="stopped at"):
        search.plan_for(0.9)


def test_on_policy_search_scores_the_teachers_own_continuations(skip_folders):
    from sparsify.convert.skip.draft_search import search_draft_plan, teacher_continuations

    model = _skip_model(skip_folders["llama"])
    prompts = [IDS[:, :6]]
    continued = teacher_continuations(model, prompts, 5)
    with torch.no_grad(), drafting(model, DraftPlan()):
        want, _ = reference_decode(model, IDS[:, :6], steps=4)
    assert continued[0].tolist() == want.tolist()  # the prompt, then the teacher's greedy tokens
    search = search_draft_plan(model, continued, max_share=0.5, scored_from=5)
    assert search.tune_tokens == 2 * 6 and search.steps[0].agreement == 1.0  # the teacher agrees with its own choices
    assert "continuations" in search.plan_for(0.5).chosen_by["search"]
    with pytest.raises(SparsifyError, match="at least 1 token"):
        teacher_continuations(model, prompts, 0)


def test_eval_times_speculative_decoding_against_the_teacher_on_the_static_cache_engine(dense_models, tmp_path):
    """`sparsify eval --decode-engine speculative`: the skip model decodes speculatively with its saved
    plan, the teacher (no gates) on the graph engine; the report says what was drafted and accepted."""
    from sparsify.eval.options import EvalOptions
    from sparsify.eval.report import metric_rows
    from sparsify.eval.run import evaluate

    folder = upcycle(str(dense_models["llama"]), "skip", tmp_path / "planned").output  # with the tokenizer
    model = _skip_model(folder)
    DraftPlan(("0.ffn",)).save_to(model)
    model.save_pretrained(folder)
    options = EvalOptions(teacher=str(dense_models["llama"]), suite="cost", speed_batch="1", prompt_len=6, decode_tokens=8,
                          decode_engine="speculative", draft_tokens=2, repeats=1, device="cpu")
    report = evaluate(str(folder), options)
    mine, teachers = report["cost"]["model"]["speed"]["batch_1"], report["cost"]["teacher"]["speed"]["batch_1"]
    assert mine["decode_engine"] == "speculative (static cache, eager)" and teachers["decode_engine"].startswith("static-cache")
    drafted = mine["decode_speculative"]
    assert drafted["plan"]["skip"] == ["0.ffn"] and drafted["draft_tokens"] == 2 and 0 <= drafted["acceptance_rate"] <= 1
    assert drafted["rounds"] >= 7 / 3 and mine["decode_tokens_per_s"]["median"] > 0
    labels = [row.label for row in metric_rows(report)]
    assert any(label.startswith("speculative: drafts accepted, batch 1 (1 of 4 sublayers skipped") for label in labels)
    with pytest.raises(SparsifyError, match="this model has none"):
        evaluate(str(dense_models["llama"]), options)


def test_a_model_drafts_with_its_saved_plan_and_a_given_threshold_gates_the_rest(skip_folders):
    model = _skip_model(skip_folders["llama"])
    assert DraftPlan.for_model(model, 0.7) == DraftPlan.per_token(0.7)  # nothing saved: the gates per token
    saved = DraftPlan(("0.ffn", "1.attention"))
    saved.save_to(model)
    assert DraftPlan.for_model(model) == saved
    assert DraftPlan.for_model(model, 0.7) == DraftPlan(saved.skip, gated=True, threshold=0.7)
    assert saved.summary(4) == "2 of 4 sublayers skipped (50%), the rest run"
    assert DraftPlan.per_token(0.7).summary(4) == "every gate per token at 0.7"


@pytest.mark.skipif(not graphs_supported(), reason="needs a GPU and nvcc for the graph engine's kernels")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_verification_reproduces_the_teachers_decode_steps_in_bf16_on_gpu(skip_folders, family):
    """The verify pass runs the teacher's sublayers through the step's fused kernels, k + 1 tokens at
    once: its logits for each verified token are the teacher's decode-step logits for it, and
    speculative greedy decoding in bf16 gives the teacher engine's tokens up to a near-tie."""
    from support import assert_decodes_alike_in_low_precision

    model = AutoModelForCausalLM.from_pretrained(skip_folders[family], dtype=torch.bfloat16).cuda().eval()
    randomise_gates(model)
    prompt, steps, k = IDS[:1, :6].cuda(), 12, 3
    with torch.no_grad(), drafting(model, DraftPlan()):  # every gate open: the teacher
        want_ids, want_logits = engine_decode(model, prompt, steps=steps, use_graph=True)
    plan = _plans(model)["static half"]
    decoder = SpeculativeDecoder(model, 1, prompt.shape[1] + steps + 1, plan, k, use_graph=True)
    assert all(decoder.fused_attention) and all(decoder.fused_mlp) and decoder.verify_scratch is not None
    with torch.no_grad(), drafting(model, DraftPlan()):
        decoder.draft.prefill(prompt)
        start = prompt.shape[1]  # the prefill's token sits here; the teacher's step at slot start + i gave want_logits[i]
        slots = start + torch.arange(k + 1, device="cuda")
        verified = decoder._verify(want_ids[:, start:start + k + 1], slots)
    assert_decodes_alike_in_low_precision((want_ids[:, :start + k + 2], list(verified.unbind(1))),
                                          (want_ids[:, :start + k + 2], want_logits[:k + 1]))
    got = decoder.generate(prompt, steps + 1).sequences
    assert_decodes_alike_in_low_precision((got, want_logits), (want_ids, want_logits))  # tokens: first difference at a near-tie
