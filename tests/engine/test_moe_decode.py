"""MoE models decode through the static-cache engine as through their own cached forward: the
fine-moe and moe variants of every supported family (Mixtral, Qwen2-MoE, Qwen3-MoE targets), on
CPU with the eager step, and on a GPU as a replayed CUDA graph under sparsify's experts
implementation (its few-token Triton kernels included)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import IDS, assert_decodes_alike_in_low_precision, engine_decode, reference_decode

from sparsify.experts import register
from sparsify.upcycle import upcycle


@pytest.fixture(scope="module")
def moe_models(dense_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe-decode")
    made = {}
    for family in ("llama", "qwen2", "qwen3"):
        made[(family, "fine-moe")] = upcycle(str(dense_weights[family]), "fine-moe", folder / f"{family}-fine", granularity=4, top_k=2).output
        made[(family, "moe")] = upcycle(str(dense_weights[family]), "moe", folder / f"{family}-moe", experts=4, top_k=2).output
    return made


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("variant", ["fine-moe", "moe"])
def test_moe_models_decode_like_their_cached_forward(family, variant, moe_models):
    model = AutoModelForCausalLM.from_pretrained(moe_models[(family, variant)]).eval()
    register()
    for implementation in ("grouped_mm", "sparsify"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            want_ids, want = reference_decode(model, IDS[:, :6], steps=6)
            got_ids, got = engine_decode(model, IDS[:, :6], steps=6, use_graph=False)
        assert got_ids.tolist() == want_ids.tolist()
        for step_got, step_want in zip(got, want, strict=True):
            torch.testing.assert_close(step_got, step_want, rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_moe_graph_replay_under_sparsify_experts_matches_the_cached_forward_on_gpu(family, moe_models):
    """The same experts implementation on both sides (its Triton kernels are checked against the
    expert loop in tests/experts/test_gpu_kernels.py): what is tested is the captured step."""
    model = AutoModelForCausalLM.from_pretrained(moe_models[(family, "fine-moe")], dtype=torch.bfloat16).cuda().eval()
    register()
    model.set_experts_implementation("sparsify")
    from sparsify.engine.graph_decode import GraphDecoder

    engine = GraphDecoder(model, batch=1, max_len=16)
    assert engine.routed_ffn_kernels, engine.routed_ffn_skipped  # the fused sublayer (tests/engine/test_routed_ffn.py)
    prompt = IDS[:, :6].cuda()
    with torch.no_grad():
        want_ids, want = reference_decode(model, prompt, steps=8)
        got_ids, got = engine_decode(model, prompt, steps=8, use_graph=True)
    assert_decodes_alike_in_low_precision((got_ids, got), (want_ids, want))
