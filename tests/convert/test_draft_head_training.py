"""The draft head (convert/skip/draft_head.py) and its training: chains computed all at once are the
head run one token at a time; a saved head loads back the same; training raises the head's scores,
and a killed run resumes to the same head as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from support import IDS, build_dense

from sparsify.convert.skip.draft_head import DraftHead, find_draft_head, run_chains, top_hidden
from sparsify.convert.skip.draft_head_training import DraftHeadOptions, fit_draft_head
from sparsify.convert.skip.draft_search import teacher_continuations
from sparsify.errors import SparsifyError


@pytest.fixture(scope="module")
def model():
    model = build_dense("llama").eval()
    model.requires_grad_(False)
    return model


def _one_token_at_a_time(head, model, hidden, ids, start, depth):
    """Depth 1..depth of the chain from `start`, each a plain causal pass over the items before it."""
    decoder = model.model
    features = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, : start]], dim=1)  # items 0..start read h[-1]=0 .. h[start-1]
    tokens = ids[:, : start + 1]
    found = []
    for j in range(depth):
        positions = torch.arange(features.shape[1])
        out = head(features, decoder.embed_tokens(tokens), decoder.rotary_emb(features, positions[None]), None)[:, -1:]
        found.append(out[:, 0])
        features = torch.cat([features, out], dim=1)
        tokens = torch.cat([tokens, ids[:, start + j + 1: start + j + 2]], dim=1)
    return found


def test_chains_run_at_once_are_the_head_run_one_token_at_a_time(model):
    head = DraftHead(model).eval()
    ids = IDS[:, :10]
    with torch.no_grad():
        hidden, states = top_hidden(model, ids)
        assert states is hidden
        chains = run_chains(head, model, states, ids, 3)
        for start in (0, 4, 6):
            for j, want in enumerate(_one_token_at_a_time(head, model, hidden, ids, start, 3)):
                torch.testing.assert_close(chains[j][:, start], want, rtol=1e-4, atol=1e-4)
    assert [c.shape[1] for c in chains] == [10, 9, 8]


def test_a_saved_head_loads_back_the_same_and_a_head_of_another_width_is_refused(model, tmp_path):
    head = DraftHead(model, init_from_layer=0, feature_layers=[0, 1])
    assert head.read_layers == [0, 1] and head.reduce is not None
    head.config.training = {"steps": 3}
    head.save(tmp_path / "draft_head")
    assert find_draft_head(tmp_path) == tmp_path / "draft_head" and find_draft_head(tmp_path / "nothing") is None
    loaded = DraftHead.load(tmp_path / "draft_head", model)
    assert loaded.config == head.config
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(SparsifyError, match="hidden size 64"):
        DraftHead.load(tmp_path / "draft_head", build_dense("llama", hidden_size=32, head_dim=8))
    with pytest.raises(SparsifyError, match="no draft head"):
        DraftHead.load(tmp_path, model)
    with pytest.raises(SparsifyError, match="not layer 5"):
        DraftHead(model, init_from_layer=5)
    with pytest.raises(SparsifyError, match="--feature-layers must name layers 0..1"):
        DraftHead(model, feature_layers=[0, 7])
    assert DraftHead(model, feature_layers=[1]).config.feature_layers == []  # the top layer alone is the default


def _data(model):
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (24, 8), generator=generator)
    fit = torch.cat(teacher_continuations(model, [prompts[:16]], 16))  # the teacher's own text: a head can learn it
    return fit, torch.cat([prompts[16:], torch.randint(0, model.config.vocab_size, (8, 16), generator=generator)], dim=1)


OPTIONS = dict(batch_size=4, window_len=24, lr=3e-3, warmup_steps=2, score_windows=8, score_prompt_len=8, score_new_tokens=16, score_depth=3)


@pytest.mark.parametrize("feature_layers", [(), (0, 1)], ids=["top layer", "every layer"])
def test_training_raises_the_heads_scores(model, feature_layers):
    fit, tune = _data(model)
    head = DraftHead(model, feature_layers=list(feature_layers))
    # Start with the token buried ([I | I], the fuse before balancing): balanced, a copied last layer
    # already drafts this repetitive text about as well as it can, and training has nothing to show.
    head.balance_inputs = lambda feature_rms, embedding_rms: None
    result = fit_draft_head(head, model, fit, tune, DraftHeadOptions(steps=12, feature_layers=feature_layers, **OPTIONS))
    assert result.losses[-1] < result.losses[0]
    before, after = result.scores_before.accept_by_depth, result.scores.accept_by_depth  # on the teacher's own text, as trained
    assert len(after) == 3 and after[0] >= after[1] >= after[2] and sum(after) > sum(before)
    assert 0 <= result.scores.agreement <= 1  # tune windows of random tokens: nothing to learn there
    assert result.record()["tokens_seen"] == 12 * 4 * 24 and not any(p.requires_grad for p in head.parameters())


def test_a_killed_run_resumes_to_the_same_head(model, tmp_path):
    fit, tune = _data(model)
    options = DraftHeadOptions(steps=6, checkpoint_every=2, depth=2, **OPTIONS)
    whole = DraftHead(model)
    fit_draft_head(whole, model, fit, tune, options)

    def kill(step, total, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_draft_head(DraftHead(model), model, fit, tune, options, run_dir=tmp_path, on_step=kill)
    resumed = DraftHead(model)
    result = fit_draft_head(resumed, model, fit, tune, options, run_dir=tmp_path)
    assert result.resumed_from == 4
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(SparsifyError, match=r"another run \(its options differ\)"):
        fit_draft_head(DraftHead(model), model, fit, tune, DraftHeadOptions(steps=8, checkpoint_every=2, **OPTIONS), run_dir=tmp_path)


@pytest.mark.parametrize("change, message", [(dict(steps=0), "--steps"), (dict(window_len=4), "--window-len"),
                                             (dict(depth=9), "--depth"), (dict(score_prompt_len=24), "shorter than a window")])
def test_bad_options_get_one_line(model, change, message):
    with pytest.raises(SparsifyError, match=message):
        DraftHeadOptions(**{**OPTIONS, **change}).check()


def test_fit_on_the_teacher_keeps_each_windows_first_half_and_continues_it_greedily(model):
    from sparsify.convert.skip.draft_head_copy import teacher_text
    from support import reference_decode

    windows = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(5))
    text = teacher_text(model, windows, DraftHeadOptions(window_len=12, batch_size=2), torch.device("cpu"))
    assert text.shape == windows.shape and torch.equal(text[:, :6], windows[:, :6])
    with torch.no_grad():
        greedy, _ = reference_decode(model, windows[:1, :6], steps=5)
    assert torch.equal(text[:1], greedy)
