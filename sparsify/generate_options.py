"""Options of `sparsify generate` (torch-free, so `--help` and bad values answer at once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsify.option_values import check_rules, require


SPECULATIVE_ENGINES = ("auto", "graph", "transformers")
DRAFT_SOURCES = ("auto", "head", "gates")  # --draft: the saved head if any, the head (required), a skip model's gates


@dataclass
class GenerateOptions:
    max_new_tokens: int = field(default=64, metadata={"help": "New tokens per prompt."})
    speculative: bool = field(
        default=False,
        metadata={"help": "Speculative decoding that keeps the teacher's output: a draft head (made by `sparsify draft-head`) or a "
                          "skip model's gates at --draft-threshold draft tokens, and the model with every gate open (the dense "
                          "teacher) verifies them in one pass."},
    )
    draft: str = field(
        default="auto", metadata={"help": "--speculative: what drafts: head (the model's draft head), gates (a skip model's own "
                                          "gates and draft plan), or auto (the head where the model folder has one)."})
    draft_threshold: float | None = field(
        default=None, metadata={"help": "--speculative: the gates' threshold while drafting (higher: more skipping); auto: the model's."})
    draft_tokens: int = field(default=4, metadata={"help": "--speculative: tokens drafted per verification."})
    engine: str = field(
        default="auto",
        metadata={"help": "--speculative: graph (the static-cache engine, one CUDA graph per round: greedy, prompts of one length, "
                          "Llama-style models), transformers (any batch, sampling), or auto (graph on a GPU where it applies)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding (speculative sampling keeps the teacher's distribution)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the most likely tokens up to this mass."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})
    device: str = field(default="auto", metadata={"help": "cuda, cpu or auto (cuda when there is one)."})

    def validate(self) -> None:
        check_rules(self, (
            ("max_new_tokens", lambda v: v >= 1, "must be at least 1"),
            ("draft_tokens", lambda v: v >= 1, "must be at least 1"),
            ("temperature", lambda v: v > 0, "must be above 0"),
            ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
        ))
        require(self.draft_threshold is None or 0 < self.draft_threshold < 1,
                f"--draft-threshold must be between 0 and 1, got {self.draft_threshold}")
        require(self.device in ("auto", "cuda", "cpu"), f"--device must be auto, cuda or cpu, got '{self.device}'")
        require(self.draft == "auto" or self.speculative, f"--draft {self.draft} applies to --speculative decoding; add --speculative")
        require(self.draft in DRAFT_SOURCES, f"--draft must be one of {', '.join(DRAFT_SOURCES)}, got '{self.draft}'")
        require(self.engine in SPECULATIVE_ENGINES, f"--engine must be one of {', '.join(SPECULATIVE_ENGINES)}, got '{self.engine}'")
        require(not (self.engine == "graph" and self.do_sample),
                "--engine graph decodes greedily; drop --do-sample or use --engine transformers")
