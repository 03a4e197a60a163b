"""Helpers the tests share (fixtures are in conftest.py): tiny models built in-test, the installed
command, token ids, gate randomisation and tiny training options. Importable as `support` from every
test folder (pytest's `pythonpath` setting in pyproject.toml)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from sparsify.convert.skip.modeling_skip import cache_argument, returned_cache

FAMILY_CONFIGS = {
    "llama": dict(
        model_type="llama", tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    ),
    "mistral": dict(model_type="mistral", sliding_window=8),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
}
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,  # divisible by 2, 3, 4, 6, 8, 12
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,  # SmolLM2's tokenizer
    max_position_embeddings=256,
)


def build_dense(family: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**COMMON, **FAMILY_CONFIGS[family], **overrides}
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random-init weights are small and the model near-uniform; widen them so logits are peaked and
    # a wrong conversion cannot hide inside the tolerance.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
    return model.eval()


def sparsify_command() -> list[str]:
    """The installed console script, next to this interpreter."""
    executable = __import__("sys").executable
    beside = [Path(executable).parent / "sparsify", Path(os.path.realpath(executable)).parent / "sparsify"]
    found = next((str(script) for script in beside if script.exists()), None) or shutil.which("sparsify")
    assert found, "the sparsify console script is not installed; run `pip install -e .`"
    return [str(found)]



# Two real-tokenizer-sized rows of token ids for the skip tests.
IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 429, 2940, 12], [1, 9, 99, 999, 4000, 12000, 20, 3, 77, 5, 6, 7]])


def randomise_gates(model, seed=0):
    """Gates that keep about half the tokens, differently per token, layer and sublayer."""
    generator = torch.Generator().manual_seed(seed)
    for _, _, gate in model.skip_gates():
        gate.weight.data = torch.randn(gate.weight.shape, generator=generator) * 0.5
        gate.bias.data.zero_()


def tiny_options(corpus, **overrides):
    """Training options that run in seconds on the tiny students: 12 steps of 4 x 32 tokens."""
    from sparsify.train.options import TrainOptions

    settings = dict(
        data=str(corpus["train"]), eval_data=str(corpus["valid"]), tokens="1536", seq_len=32, batch_size=4,
        eval_every=0, eval_tokens="512", checkpoint_every=0, lr=3e-3, router_lr=3e-2, lora_rank=4, lora_alpha=8.0,
    )
    return TrainOptions.of(**{**settings, **overrides})


def reference_decode(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding through the model's own forward pass and cache: tokens and per-step logits."""
    out = model(input_ids=prompt, use_cache=True)
    cache, ids, logits = returned_cache(out), prompt, []
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        ids = torch.cat([ids, token], dim=1)
        out = model(input_ids=token, use_cache=True, **{cache_argument(model.forward): cache})
        cache = returned_cache(out)
        logits.append(out.logits[:, -1])
        token = out.logits[:, -1:].argmax(-1)
    return torch.cat([ids, token], dim=1), logits


def engine_decode(model, prompt: torch.Tensor, steps: int, use_graph: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same greedy decoding through sparsify's static-cache engine (eager step or CUDA graph)."""
    from sparsify.engine.graph_decode import GraphDecoder

    engine = GraphDecoder(model, batch=prompt.shape[0], max_len=prompt.shape[1] + steps + 1, use_graph=use_graph)
    engine.prefill(prompt)
    logits = []
    for _ in range(steps):
        engine.step()
        logits.append(engine.last_logits[:, -1].clone())
    return engine.history[:, : prompt.shape[1] + steps + 1].clone(), logits


def record_gate_decisions(model) -> tuple[list[torch.Tensor], list]:
    """Hooks on every skip gate appending its keep decision: (decisions, hook handles to remove)."""
    decisions: list[torch.Tensor] = []
    hooks = [gate.register_forward_hook(lambda m, i, out: decisions.append(out[1])) for _, _, gate in model.skip_gates()]
    return decisions, hooks


def assert_decodes_alike_in_low_precision(got: tuple, want: tuple, share: float = 0.02) -> None:
    """bf16 decoding against the reference: per step, the logits within `share` of their largest
    magnitude and the same greedy token, per sequence, until a step where the reference's best two
    logits lie within that tolerance of each other (a near-tie that a rounding may break either
    way); the sequence is not compared after it, since the two then decode different text."""
    got_ids, got_logits = got
    want_ids, want_logits = want
    start = got_ids.shape[1] - len(got_logits) - 1
    for sequence in range(got_ids.shape[0]):
        for step, (step_got, step_want) in enumerate(zip(got_logits, want_logits, strict=True)):
            row_got, row_want = step_got[sequence].float(), step_want[sequence].float()
            tolerance = share * row_want.abs().max().item()
            torch.testing.assert_close(row_got, row_want, rtol=0, atol=tolerance)
            if got_ids[sequence, start + step + 1] != want_ids[sequence, start + step + 1]:
                best_two = row_want.topk(2).values
                assert best_two[0] - best_two[1] <= 2 * tolerance, f"sequence {sequence} step {step}: different token, no near-tie"
                break


# Run in a fresh interpreter where importing sparsify fails: what a user without sparsify gets.
_FORWARD_WITHOUT_SPARSIFY = r"""
import sys, json, torch
sys.modules["sparsify"] = None
from transformers import AutoModelForCausalLM
folder, ids, out, remote = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3], sys.argv[4] == "1"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
with torch.no_grad():
    torch.save({"type": type(model).__name__, "logits": model(ids).logits}, out)
"""


def forward_without_sparsify(folder, ids: torch.Tensor, work, trust_remote_code: bool = True):
    """(completed process, {"type": model class name, "logits": logits of `ids`} or None when it failed)."""
    out = Path(work) / "forward_without_sparsify.pt"
    done = subprocess.run([sys.executable, "-c", _FORWARD_WITHOUT_SPARSIFY, str(folder), json.dumps(ids.tolist()), str(out),
                           "1" if trust_remote_code else "0"], capture_output=True, text=True, timeout=300)
    return done, (torch.load(out) if done.returncode == 0 else None)
