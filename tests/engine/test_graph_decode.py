"""The static-cache decode engine computes what the model's own cached forward computes: same logits
step by step, same greedy tokens, for dense models and skip models whose gates really skip. On CPU
the step runs eagerly (decisions on the host); the CUDA-graph capture of the same step, with
conditional nodes and fused norm-and-gate kernels, is checked on a GPU (marked tests below, and
bench/skip_overhead.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import IDS, engine_decode, randomise_gates, record_gate_decisions, reference_decode

from sparsify.errors import SparsifyError
from sparsify.engine.graph_decode import GraphDecoder, graphs_supported
from sparsify.upcycle import upcycle



@pytest.fixture(scope="module")
def skip_models(dense_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("skip-graph")
    return {family: upcycle(str(dense_weights[family]), "skip", folder / family).output for family in ("llama", "qwen2", "qwen3")}


def _assert_same_decoding(got: tuple, want: tuple) -> None:
    """Same greedy tokens, and the same logits at every step to 1e-4."""
    assert got[0].tolist() == want[0].tolist()
    for step_got, step_want in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(step_got, step_want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dense_decode_matches_the_models_cached_forward(family, dense_weights):
    model = AutoModelForCausalLM.from_pretrained(dense_weights[family]).eval()
    with torch.no_grad():
        expected_ids, expected = reference_decode(model, IDS[:, :6], steps=8)
        ids, logits = engine_decode(model, IDS[:, :6], steps=8)
    _assert_same_decoding((ids, logits), (expected_ids, expected))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_skip_decode_takes_the_same_decisions_and_tokens_at_batch_1(family, skip_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models[family]).eval()
    randomise_gates(model, seed=3)
    decisions, hooks = record_gate_decisions(model)
    with torch.no_grad():
        expected_ids, expected = reference_decode(model, IDS[:1, :6], steps=10)
        reference_decisions = torch.cat([d.reshape(-1) for d in decisions])
        decisions.clear()
        ids, logits = engine_decode(model, IDS[:1, :6], steps=10)
    for hook in hooks:
        hook.remove()
    engine_decisions = torch.cat([d.reshape(-1) for d in decisions])  # its prefill is the model's own forward
    assert 0.2 < engine_decisions.float().mean() < 0.8  # the gates really skip
    assert engine_decisions.tolist() == reference_decisions.tolist()
    _assert_same_decoding((ids, logits), (expected_ids, expected))


def test_batched_skip_decode_masks_per_sequence(skip_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models["qwen2"]).eval()
    randomise_gates(model, seed=4)
    with torch.no_grad():
        expected_ids, expected = reference_decode(model, IDS[:, :6], steps=6)
        ids, logits = engine_decode(model, IDS[:, :6], steps=6)
    _assert_same_decoding((ids, logits), (expected_ids, expected))


def test_frozen_gates_decode_like_the_model_and_are_counted(skip_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models["llama"]).eval()
    randomise_gates(model, seed=9)
    gates = model.skip_gates()
    model.freeze_gates({f"{layer}.{sublayer}": index % 2 == 1 for index, (layer, sublayer, _) in enumerate(gates[::2])})
    with torch.no_grad():
        expected_ids, expected = reference_decode(model, IDS[:, :6], steps=6)
        engine = GraphDecoder(model, batch=2, max_len=13, use_graph=False)
        engine.prefill(IDS[:, :6])
        engine.decisions = []
        logits = []
        for _ in range(6):
            engine.step()
            logits.append(engine.last_logits[:, -1].clone())
    _assert_same_decoding((engine.history[:, :13].clone(), logits), (expected_ids, expected))
    assert len(engine.decisions) == 6 * len(gates)  # every gate, frozen or not, at every step


def test_unsupported_models_and_lengths_are_refused(dense_weights, skip_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models["llama"]).eval()
    engine = GraphDecoder(model, batch=1, max_len=8, use_graph=False)
    with pytest.raises(SparsifyError, match="does not fit"):
        engine.prefill(IDS[:1, :8])
    with pytest.raises(SparsifyError, match="Llama-style"):
        GraphDecoder(torch.nn.Linear(2, 2), batch=1, max_len=8)
    mistral = AutoModelForCausalLM.from_pretrained(dense_weights["mistral"]).eval()
    window = mistral.config.sliding_window
    if window:
        with pytest.raises(SparsifyError, match="sliding"):
            GraphDecoder(mistral, batch=1, max_len=window + 1, use_graph=False)


@pytest.mark.skipif(not graphs_supported(), reason="needs a GPU and CUDA graph conditional nodes")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_graph_replay_equals_the_eager_step_on_gpu(family, skip_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models[family]).cuda().eval()
    randomise_gates(model, seed=3)
    model.cuda()
    with torch.no_grad():
        eager_ids, eager = engine_decode(model, IDS[:1, :6].cuda(), steps=10, use_graph=False)
        graph_ids, graphed = engine_decode(model, IDS[:1, :6].cuda(), steps=10, use_graph=True)
    _assert_same_decoding((graph_ids, graphed), (eager_ids, eager))


def test_measure_speed_times_decode_through_the_engine(skip_models):
    from sparsify.eval.cost import measure_speed

    model = AutoModelForCausalLM.from_pretrained(skip_models["llama"]).eval()
    randomise_gates(model, seed=5)
    speed = measure_speed(model, IDS.reshape(-1), batch_sizes=[1, 2], prompt_len=6, decode_tokens=4, warmup=1, repeats=2,
                          pad_token_id=0, decode_engine="graph")
    for name in ("batch_1", "batch_2"):
        entry = speed[name]
        assert entry["decode_engine"].startswith("static-cache") and entry["decode_ms_per_step"]["repeats"] == 2  # CPU: eager
        assert 0 < entry["decode_ms_per_step"]["min"] <= entry["decode_ms_per_step"]["median"] <= entry["decode_ms_per_step"]["max"]
    assert speed["batch_2"]["decode_tokens_per_s"]["median"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dense_graph_replay_equals_the_models_cached_forward_on_gpu(dense_weights):
    model = AutoModelForCausalLM.from_pretrained(dense_weights["qwen3"]).cuda().eval()
    with torch.no_grad():
        expected_ids, expected = reference_decode(model, IDS[:, :6].cuda(), steps=8)
        ids, logits = engine_decode(model, IDS[:, :6].cuda(), steps=8, use_graph=True)
    _assert_same_decoding((ids, logits), (expected_ids, expected))


@pytest.mark.skipif(not graphs_supported(), reason="needs a GPU and nvcc for the decode kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_and_gate_kernel_match_the_modules_on_gpu(dtype, skip_models):
    from sparsify.engine.decode_kernels import DecodeKernels, fusable_norm

    model = AutoModelForCausalLM.from_pretrained(skip_models["llama"], dtype=dtype).eval()
    randomise_gates(model, seed=6)
    model.cuda()
    block = model.model.layers[0]
    norm, gate = block.input_layernorm, block.sparsify_gates[0]
    norm.weight.data.normal_(1.0, 0.2)
    assert fusable_norm(norm, dtype)
    kernels = DecodeKernels(torch.device("cuda"), torch.cuda.Stream())
    hidden = torch.randn(16, 1, model.config.hidden_size, device="cuda").to(dtype) * 3
    with torch.no_grad():
        expected = norm(hidden)
        torch.testing.assert_close(kernels.rms_norm(norm, hidden), expected, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-5)
        mask = torch.full((16, 1, 1), 7.0, dtype=dtype, device="cuda")
        normed, handle = kernels.norm_gate(norm, hidden, gate, mask)
        keep = gate(normed)[1]
    assert handle is None and 0 < keep.sum() < 16  # the gate really splits the batch
    assert mask.reshape(-1).tolist() == keep.reshape(-1).float().tolist()


@pytest.mark.skipif(not graphs_supported(), reason="needs a GPU and CUDA graph conditional nodes")
def test_batched_graph_replay_masks_per_sequence_on_gpu(skip_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models["qwen2"]).cuda().eval()
    randomise_gates(model, seed=4)
    model.cuda()
    with torch.no_grad():
        expected_ids, expected = reference_decode(model, IDS[:, :6].cuda(), steps=6)
        ids, logits = engine_decode(model, IDS[:, :6].cuda(), steps=6, use_graph=True)
    _assert_same_decoding((ids, logits), (expected_ids, expected))
