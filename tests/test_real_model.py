"""The real SmolLM2-135M-Instruct (GGUF, Llama architecture): conversions reproduce it on real text."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsify.sources import load_model
from sparsify.upcycle import upcycle

pytestmark = pytest.mark.slow
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus" / "valid.jsonl.gz"

VANILLA = r"""
import sys, json, torch
sys.modules["sparsify"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text, out = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = tokenizer(text, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
    greedy = model.generate(ids[:, :16], max_new_tokens=20, do_sample=False)[0].tolist()
torch.save({"ids": ids, "logits": logits, "greedy": greedy}, out)
"""


def real_text() -> str:
    if CORPUS.exists():
        with gzip.open(CORPUS, "rt") as handle:
            return json.loads(handle.readline())["text"][:600]
    return "The scheduler picks the next task to run from the run queue of each CPU, " * 4


@pytest.fixture(scope="module")
def teacher():
    return load_model("smollm2-135m", dtype=torch.float32)


@pytest.mark.parametrize(
    "name,to,options",
    [("fine-moe-g8", "fine-moe", dict(granularity=8)), ("moe-e4-k2", "moe", dict(experts=4, top_k=2))],
)
def test_real_model_conversion_is_exact(teacher, tmp_path, name, to, options):
    result = upcycle("smollm2-135m", to, tmp_path / name, **options)
    assert result.plan.exactness.exact
    done = subprocess.run(
        [sys.executable, "-c", VANILLA, str(result.output), real_text(), str(tmp_path / "run.pt")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    run = torch.load(tmp_path / "run.pt")
    assert run["ids"].shape[1] > 100
    with torch.no_grad():
        expected = teacher(run["ids"]).logits
        greedy = teacher.generate(run["ids"][:, :16], max_new_tokens=20, do_sample=False)[0].tolist()
    torch.testing.assert_close(run["logits"], expected, rtol=0, atol=1e-4)
    assert run["greedy"] == greedy
