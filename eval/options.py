"""Everything `sparsify eval` is configured by. The CLI builds its flags from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sparsify.errors import SparsifyError
from sparsify.generate_options import DRAFT_SOURCES
from sparsify.option_values import DTYPE_NAMES, check_rules, dtype_name, parse_count, parse_list

SUITES = ("quality", "cost", "routing", "tasks")
DECODE_ENGINES = ("hf", "graph", "speculative")


@dataclass
class EvalOptions:
    teacher: str = field(default="", metadata={"help": "The dense model to compare with (alias, folder, .gguf, Hub id); none: the model alone."})
    data: str = field(default="", metadata={"help": "Held-out text for quality and routing: files/globs (txt, jsonl, parquet, .gz) or a Hub dataset id."})
    text_field: str = field(default="text", metadata={"help": "Column holding the text in jsonl/parquet/Hub data."})
    suite: str = field(default="quality,cost,routing", metadata={"help": "What to measure, comma-separated: quality, cost, routing, tasks."})
    tokens: str = field(default="64k", metadata={"help": "Held-out tokens scored for quality."})
    window: int = field(default=1024, metadata={"help": "Sliding-window length for perplexity."})
    stride: int = field(default=512, metadata={"help": "Sliding-window stride (each token is scored once, with at least window - stride context)."})
    batch_size: int = field(default=4, metadata={"help": "Windows per forward pass (quality, routing, tasks)."})
    routing_tokens: str = field(default="32k", metadata={"help": "Tokens watched for the routing statistics."})
    speed_batch: str = field(default="1,8", metadata={"help": "Batch sizes for the prefill/decode speed measurement."})
    prompt_len: int = field(default=256, metadata={"help": "Prompt tokens per sequence for the speed measurement."})
    decode_tokens: int = field(default=32, metadata={"help": "Tokens generated per sequence when timing decode (0 or 1: skip decode)."})
    decode_engine: str = field(default="hf", metadata={"help": "Decode timing engine: hf (transformers generate), graph (static KV cache, each step one CUDA graph, gated sublayers as conditional nodes; Llama-style models) or speculative (greedy speculative decoding on the graph engine, drafted by the model's draft head or a skip model's gates, the teacher timed on graph)."})
    draft_tokens: int = field(default=4, metadata={"help": "--decode-engine speculative: tokens drafted per verification."})
    draft: str = field(default="auto", metadata={"help": "--decode-engine speculative: what drafts: head (the model's draft head, from `sparsify draft-head`), gates (a skip model's gates and draft plan), or auto (the head where the model folder has one)."})
    draft_threshold: float | None = field(default=None, metadata={"help": "--decode-engine speculative: gate the sublayers the draft keeps per token at this threshold; auto: the model's saved draft plan as it is (else its gates at its own threshold)."})
    warmup: int = field(default=1, metadata={"help": "Untimed runs before each speed measurement."})
    repeats: int = field(default=3, metadata={"help": "Timed runs per speed measurement (the median is reported, with min and max)."})
    tasks: str = field(default="", metadata={"help": "lm-evaluation-harness tasks, comma-separated (e.g. sparsify_tiny, hellaswag)."})
    tasks_path: str = field(default="", metadata={"help": "Folders of extra task YAMLs (for local, offline task data), comma-separated."})
    task_limit: int = field(default=0, metadata={"help": "Examples per task (0: all)."})
    num_fewshot: int = field(default=-1, metadata={"help": "Few-shot examples per task (-1: the task's default)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu, cuda, cuda:N."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32 (bfloat16, float16, float32 also read)."})

    def for_teacher(self) -> EvalOptions:
        """The teacher's settings: it has no draft path, so speculative decoding is compared with the
        teacher on the same static-cache engine."""
        return replace(self, decode_engine="graph") if self.decode_engine == "speculative" else self

    @property
    def suites(self) -> list[str]:
        return parse_list(self.suite)

    @property
    def speed_batches(self) -> list[int]:
        try:
            return [int(b) for b in parse_list(self.speed_batch)]
        except ValueError as error:
            raise SparsifyError(f"--speed-batch takes comma-separated batch sizes (e.g. 1,8), not '{self.speed_batch}'") from error

    @property
    def task_names(self) -> list[str]:
        return parse_list(self.tasks)

    @property
    def task_paths(self) -> list[str]:
        return parse_list(self.tasks_path)

    def validate(self) -> None:
        unknown = set(self.suites) - set(SUITES)
        if unknown or not self.suites:
            raise SparsifyError(f"unknown --suite {', '.join(sorted(unknown)) or '(empty)'}; choose from {', '.join(SUITES)}")
        if {"quality", "routing"} & set(self.suites) and not self.data:
            raise SparsifyError("the quality and routing suites need held-out text: pass --data (e.g. ../shared/data/corpus/valid.jsonl.gz)")
        if "tasks" in self.suites and not self.task_names:
            raise SparsifyError("the tasks suite needs --tasks (e.g. --tasks sparsify_tiny)")
        dtype_name(self.dtype, "--dtype", tuple(set(DTYPE_NAMES.values())))
        if self.decode_engine not in DECODE_ENGINES:
            raise SparsifyError(f"--decode-engine must be one of {', '.join(DECODE_ENGINES)}")
        if self.draft not in DRAFT_SOURCES:
            raise SparsifyError(f"--draft must be one of {', '.join(DRAFT_SOURCES)}, got '{self.draft}'")
        if self.draft_threshold is not None and not 0 < self.draft_threshold < 1:
            raise SparsifyError(f"--draft-threshold must be between 0 and 1, got {self.draft_threshold}")
        if not self.speed_batches or any(b < 1 for b in self.speed_batches) or self.prompt_len < 1 or self.repeats < 1:
            raise SparsifyError("--speed-batch, --prompt-len and --repeats must be positive")
        check_rules(self, _RULES)
        if not 0 < self.stride < self.window:
            raise SparsifyError(f"--stride must be at least 1 and below --window ({self.window}), not {self.stride}")
        if parse_count(self.tokens) < 2:
            raise SparsifyError(f"--tokens {self.tokens}: score at least 2 tokens (e.g. --tokens 64k)")
        if parse_count(self.routing_tokens) < 1:
            raise SparsifyError(f"--routing-tokens {self.routing_tokens}: watch at least 1 token (e.g. --routing-tokens 32k)")
        if self.data:
            from sparsify.text_files import check_sources

            check_sources(parse_list(self.data), "--data")


# (field, accepts, what the rule is): numeric options a measurement cannot sensibly take.
_RULES = (
    ("window", lambda v: v >= 2, "must be at least 2"),
    ("batch_size", lambda v: v >= 1, "must be at least 1"),
    ("decode_tokens", lambda v: v >= 0, "must be 0 or more (0 or 1: no decode timing)"),
    ("warmup", lambda v: v >= 0, "must be 0 or more"),
    ("draft_tokens", lambda v: v >= 1, "must be at least 1"),
    ("task_limit", lambda v: v >= 0, "must be 0 or more (0: every example)"),
)
