"""Self-speculative decoding in plain transformers: whatever the drafts, the output is the dense
teacher's (greedy tokens identical to its greedy decoding, batch 1 and batch > 1 with each row accepting
its own number of drafts; sampled tokens distributed as the teacher's)."""

from __future__ import annotations

import copy

import pytest
import torch
from support import IDS, randomise_gates
from transformers import AutoModelForCausalLM

from sparsify.convert.skip.speculative import Sampling, accept_sampled, speculative_generate
from sparsify.errors import SparsifyError
from sparsify.upcycle import upcycle


@pytest.fixture(scope="module")
def skip_folders(dense_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("skip-speculative")
    return {family: upcycle(str(dense_weights[family]), "skip", folder / family).output for family in ("llama", "qwen3")}


def _skip_model(folder, seed=0):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    randomise_gates(model, seed)  # about half the tokens skip each sublayer at threshold 0.5
    return model


def _teacher_greedy(dense_folder, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    teacher = AutoModelForCausalLM.from_pretrained(dense_folder, dtype=torch.float32).eval()
    greedy = copy.deepcopy(teacher.generation_config)
    greedy.eos_token_id = None  # the full length, as speculative_generate without an eos_token_id (min_new_tokens would mask EOS)
    with torch.no_grad():
        out = teacher.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy, max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize(("draft_tokens", "draft_threshold"), [(1, 0.5), (3, 0.5), (4, 0.95)])
def test_greedy_output_is_the_teachers_greedy_output_at_batch_1(skip_folders, dense_weights, family, draft_tokens, draft_threshold):
    model = _skip_model(skip_folders[family])
    prompt = IDS[:1, :6]
    result = speculative_generate(model, prompt, max_new_tokens=12, draft_tokens=draft_tokens, draft_threshold=draft_threshold)
    assert result.sequences[0, :6].tolist() == prompt[0].tolist()
    assert result.sequences[0, 6:].tolist() == _teacher_greedy(dense_weights[family], prompt, 12)
    stats = result.stats
    assert stats.rounds >= 1 and stats.drafted == stats.rounds * draft_tokens
    assert sum(stats.accepted_histogram) == stats.row_rounds and 0 <= stats.acceptance_rate <= 1
    assert [gate.threshold for _, _, gate in model.skip_gates()] == [0.5] * len(model.skip_gates())  # restored


def test_each_row_of_a_left_padded_batch_accepts_its_own_drafts_and_gets_its_own_teacher_output(skip_folders, dense_weights):
    model = _skip_model(skip_folders["llama"], seed=1)
    short, long = IDS[1, :4], IDS[0, :9]
    prompts = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), long])
    mask = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(4, dtype=torch.long)]), torch.ones(9, dtype=torch.long)])
    result = speculative_generate(model, prompts, attention_mask=mask, max_new_tokens=16, draft_tokens=3, draft_threshold=0.6)
    assert result.sequences[0, 9:].tolist() == _teacher_greedy(dense_weights["llama"], short[None], 16)
    assert result.sequences[1, 9:].tolist() == _teacher_greedy(dense_weights["llama"], long[None], 16)
    assert result.stats.uneven_rounds >= 1  # the rows really advanced by different amounts


def test_rows_stop_at_the_end_of_sequence_token_and_are_padded(skip_folders, dense_weights):
    model = _skip_model(skip_folders["llama"])
    prompt = IDS[:2, :6]
    first = _teacher_greedy(dense_weights["llama"], prompt[:1], 8)
    eos = first[3]  # row 0 emits it as its 4th token
    result = speculative_generate(model, prompt, max_new_tokens=8, draft_tokens=2, eos_token_id=eos, pad_token_id=-1)
    row = result.sequences[0, 6:].tolist()
    stop = row.index(eos)
    assert row[: stop + 1] == first[: stop + 1] and row[stop + 1:] == [-1] * (7 - stop)


def test_speculative_sampling_keeps_the_teachers_distribution():
    generator = torch.Generator().manual_seed(0)
    rows, vocab, k = 200_000, 6, 2
    p = torch.softmax(torch.randn(1, k + 1, vocab, generator=generator) * 1.5, -1).expand(rows, -1, -1)
    q = torch.softmax(torch.randn(1, k, vocab, generator=generator) * 1.5, -1).expand(rows, -1, -1)
    drafts = torch.multinomial(q[:, 0], 1, generator=generator)
    drafts = torch.cat([drafts, torch.multinomial(q[:, 1], 1, generator=generator)], dim=1)
    n, tokens = accept_sampled(drafts, q, p, generator)
    first = tokens[:, 0]  # the first emitted token: the accepted draft or the resampled one
    empirical = torch.bincount(first, minlength=vocab).float() / rows
    assert (empirical - p[0, 0]).abs().sum() / 2 < 5e-3  # total variation, sampling noise ~1e-3
    assert 0 < n.float().mean() < k  # some drafts accepted, some rejected


def test_sampled_generation_runs_and_top_p_keeps_only_the_nucleus(skip_folders):
    model = _skip_model(skip_folders["qwen3"])
    sampling = Sampling(do_sample=True, temperature=0.8, top_p=0.9)
    probs = sampling.probabilities(torch.tensor([[4.0, 3.0, 0.0, -2.0]]))
    assert probs[0, 2:].sum() == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))
    result = speculative_generate(model, IDS[:2, :5], max_new_tokens=10, draft_tokens=3, sampling=sampling,
                                  generator=torch.Generator().manual_seed(0))
    assert result.sequences.shape == (2, 15) and result.stats.rounds >= 1


def test_inputs_it_cannot_decode_exactly_are_refused_in_one_line(dense_weights, skip_folders, tmp_path):
    dense = AutoModelForCausalLM.from_pretrained(dense_weights["llama"]).eval()
    with pytest.raises(SparsifyError, match="drafts with a skip model's gates"):
        speculative_generate(dense, IDS[:1, :4], max_new_tokens=4)
    sliding = AutoModelForCausalLM.from_pretrained(upcycle(str(dense_weights["mistral"]), "skip", tmp_path / "mistral").output).eval()
    with pytest.raises(SparsifyError, match="sliding window"):
        speculative_generate(sliding, IDS[:1, :4], max_new_tokens=4)
    right_padded = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(SparsifyError, match="pad prompts on the left"):
        speculative_generate(_skip_model(skip_folders["llama"]), IDS[:2, :4], attention_mask=right_padded, max_new_tokens=4)


def test_any_of_several_end_tokens_stops_a_row(skip_folders, dense_weights):
    model = _skip_model(skip_folders["llama"])
    first = _teacher_greedy(dense_weights["llama"], IDS[:1, :6], 8)
    result = speculative_generate(model, IDS[:1, :6], max_new_tokens=8, draft_tokens=2, eos_token_id=[-5, first[2]], pad_token_id=-1)
    row = result.sequences[0, 6:].tolist()
    assert row[: row.index(first[2]) + 1] == first[: row.index(first[2]) + 1] and row[-1] == -1


def test_gates_only_training_keeps_the_verifier_the_dense_source_and_merged_adapters_are_named(dense_models, corpus, tmp_path):
    from support import tiny_options

    from sparsify.generate import verifier_note
    from sparsify.train.loop import train

    converted = upcycle(str(dense_models["llama"]), "skip", tmp_path / "skip").output
    gates_only = train(converted, tiny_options(corpus, lora_rank=0, target_skip=0.5), output=tmp_path / "gates-only").output
    adapted = train(converted, tiny_options(corpus, target_skip=0.5), output=tmp_path / "adapted").output
    assert verifier_note(str(gates_only)) is None
    assert "merged LoRA adapters" in verifier_note(str(adapted))
    model = AutoModelForCausalLM.from_pretrained(gates_only, dtype=torch.float32).eval()
    prompt = IDS[:1, :6]
    result = speculative_generate(model, prompt, max_new_tokens=10, draft_tokens=3, draft_threshold=0.5)
    assert result.sequences[0, 6:].tolist() == _teacher_greedy(dense_models["llama"], prompt, 10)
