"""The proof that a variant is one package plus one registry line: a toy variant defined here, in the
test, registered at run time, goes through upcycle, two training steps, eval and info while no core
file knows it exists.

The toy "variant" copies the dense model unchanged, marks its config, and calls the final norm its
trainable decision (with an auxiliary loss pulling the norm's weights towards 1, a training option
group of its own, a probe that counts the tokens the norm saw, and a row for `sparsify info`). This
module is at once the variant's implementation and its description module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from support import tiny_options

from sparsify.convert import Metric, Variant, register_variant, unregister_variant
from sparsify.convert.base import ConversionPlan, Exactness, kept_source_tensors, passthrough
from sparsify.convert.variant import Layout
from sparsify.eval.probes import Probe as BaseProbe
from sparsify.train.decisions import Decisions

# --- the toy variant: options ---------------------------------------------------------------------


@dataclass
class ToyOptions:
    note: str = field(default="hello", metadata={"help": "Recorded in the layout."})

    def validate(self) -> None:
        pass


@dataclass
class ToyTrainOptions:
    section: ClassVar[str] = "toy"
    toy_weight: float = field(default=0.5, metadata={"help": "Weight of the pull of the norm towards 1."})

    def validate(self) -> None:
        pass


# --- its description (what info, the card and reports read) ---------------------------------------


@dataclass(frozen=True)
class ToyLayout(Layout):
    note: str
    architecture: str = ""

    def rows(self) -> list[tuple[str, str]]:
        return [("toy note", self.note)]


LAYOUT = ToyLayout
ROUTING_KIND = "toy"


def recognises(config: dict[str, Any]) -> bool:
    return bool(config.get("toy_variant"))


def routing_rows(summary: dict[str, Any]) -> list[tuple[str, float, str]]:
    return [("tokens the toy probe saw", summary["tokens"], ",.0f")]


# --- its implementation -----------------------------------------------------------------------------


def plan(source, options: ToyOptions, dtype: torch.dtype, on_progress=None) -> ConversionPlan:
    config = {**source.config.to_dict(), "toy_variant": True, "dtype": str(dtype).removeprefix("torch.")}
    tensors = [passthrough(source.tensors, name, dtype) for name in kept_source_tensors(source)]
    layout = ToyLayout(note=options.note, architecture=config["architectures"][0])
    return ConversionPlan(config, tensors, layout, Exactness(True, "every tensor is copied unchanged"), tags=["toy"])


class ToyDecisions(Decisions):
    def __init__(self, norm: torch.nn.Module, options: ToyTrainOptions):
        super().__init__([norm])
        self.options = options

    def loss(self, output, seen):
        pull = (self.modules[0].weight.float() - 1.0).pow(2).mean()
        return self.options.toy_weight * pull, {"toy": pull}


def find_decisions(model, options: dict[str, Any]):
    if not getattr(model.config, "toy_variant", False):
        return None
    return ToyDecisions(model.model.norm, options.get("toy") or ToyTrainOptions())


class Probe(BaseProbe):
    kind = "toy"

    @classmethod
    def find(cls, model):
        return cls([model.model.norm]) if getattr(model.config, "toy_variant", False) else None

    def reset(self) -> None:
        self.tokens = 0

    def _record(self, index: int, output) -> None:
        self.tokens += output.shape[0] * output.shape[1]

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokens": self.tokens}


TOY = Variant("toy", "A toy: the dense model, its final norm trained in full.", ToyOptions, implementation=__name__,
              description=__name__, train_options=ToyTrainOptions, step_metrics=(Metric("toy", "toy pull", "toy", ".4f"),),
              decides="norms")


@pytest.fixture
def toy():
    register_variant(TOY)
    try:
        yield TOY
    finally:
        unregister_variant(TOY.name)


def test_a_variant_registered_from_outside_the_package_runs_every_stage(toy, dense_models, corpus, tmp_path):
    from sparsify.eval.options import EvalOptions
    from sparsify.eval.report import metric_rows
    from sparsify.eval.run import evaluate
    from sparsify.info import describe
    from sparsify.train.loop import train
    from sparsify.train.options import TrainOptions
    from sparsify.upcycle import upcycle

    dense = dense_models["llama"]
    converted = upcycle(str(dense), "toy", tmp_path / "toy", note="made in a test")
    record = json.loads((converted.output / "sparsify.json").read_text())
    assert record["variant"] == "toy" and record["layout"]["note"] == "made in a test"
    assert "| toy note | made in a test |" in (converted.output / "README.md").read_text()

    assert "toy_weight" in TrainOptions.of(toy_weight=0.25).flat()
    options = tiny_options(corpus, tokens="256", teacher=str(dense), toy_weight=0.5)  # 2 steps of 4 x 32 tokens
    result = train(converted.output, options, output=tmp_path / "trained")
    assert result.steps == 2 and [entry["step"] for entry in result.history] == [1, 2]
    assert all("toy" in entry and entry["toy"] >= 0 for entry in result.history)
    from safetensors.torch import load_file

    start = load_file(converted.output / "model.safetensors")["model.norm.weight"]
    trained = load_file(result.output / "model.safetensors")["model.norm.weight"]
    assert not torch.equal(start, trained)  # the decision trained in full at --router-lr

    report = evaluate(str(result.output), EvalOptions(data=str(corpus["valid"]), tokens="256", window=64, stride=32,
                                                      suite="quality,routing", teacher=str(dense)))
    assert report["model"]["variant"] == "toy"
    assert report["routing"]["toy"]["tokens"] >= 256
    rows = {row.label: row.model for row in metric_rows(report)}
    assert rows["tokens the toy probe saw"] == report["routing"]["toy"]["tokens"]

    described = describe(result.output)
    assert described.variant == "toy" and described.layout["note"] == "made in a test"
    assert described.reproduces_teacher.state == "no" and "trained on 256 tokens" in described.reproduces_teacher.reason
