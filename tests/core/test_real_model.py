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
CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "corpus" / "valid.jsonl.gz"

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


def test_eval_report_of_smollm2_and_its_exact_fine_moe(tmp_path):
    """`sparsify eval` on the real model: the exact conversion agrees with its teacher on real text,
    half-active top-4 of G=8 does not, and SmolLM2 answers the shipped task far above chance."""
    from sparsify.eval.options import EvalOptions
    from sparsify.eval.run import evaluate

    exact = upcycle("smollm2-135m", "fine-moe", tmp_path / "exact", granularity=8).output
    settings = dict(teacher="smollm2-135m", data=str(CORPUS), tokens="2k", window=512, stride=256, batch_size=2,
                    suite="quality,routing,tasks", tasks="sparsify_tiny", routing_tokens="1k")
    report = evaluate(str(exact), EvalOptions(**settings), output=tmp_path / "report")
    assert report["quality"]["vs_teacher"]["kl"] < 1e-6 and report["quality"]["vs_teacher"]["top1_agreement"] > 0.999
    assert report["quality"]["model"]["perplexity"] == pytest.approx(report["quality"]["teacher"]["perplexity"], rel=1e-4)
    assert 5 < report["quality"]["teacher"]["perplexity"] < 40  # about 14 on this corpus
    assert report["tasks"]["teacher"]["sparsify_tiny"]["acc"] >= 0.6  # chance is 0.25; measured 0.875
    assert report["tasks"]["model"]["sparsify_tiny"]["acc"] == report["tasks"]["teacher"]["sparsify_tiny"]["acc"]
    moe = report["routing"]["moe"]
    assert moe["num_experts"] == 8 and all(sum(layer["load"]) == moe["tokens"] * 8 for layer in moe["layers"])

    half = upcycle("smollm2-135m", "fine-moe", tmp_path / "half", granularity=8, top_k=4).output
    report = evaluate(str(half), EvalOptions(**{**settings, "suite": "quality"}))
    assert report["quality"]["vs_teacher"]["kl"] > 0.5  # untrained: dropping half the FFN costs a lot
