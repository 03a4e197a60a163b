"""Everything a training run is configured by. The CLI builds its `train` flags from these fields."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sparsify.errors import SparsifyError

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str | int) -> int:
    """'20M' -> 20_000_000; '512k' -> 512_000; plain integers pass through."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", text)
    if not match:
        raise SparsifyError(f"cannot read '{text}' as a count; write e.g. 5M, 512k or 20000000")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2).lower()])


@dataclass
class TrainOptions:
    data: str = field(default="", metadata={"help": "Training text: Hub dataset id, or files/globs (txt, jsonl, parquet, .gz), comma-separated."})
    eval_data: str = field(default="", metadata={"help": "Held-out text (same forms); default: a hashed 1% of --data that training never sees."})
    text_field: str = field(default="text", metadata={"help": "Column holding the text in jsonl/parquet/Hub data."})
    tokens: str = field(default="5M", metadata={"help": "Training tokens (e.g. 20M); the corpus repeats, reshuffled, if shorter."})
    seq_len: int = field(default=1024, metadata={"help": "Tokens per training block."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per micro-batch per device."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of the LoRA adapters."})
    router_lr: float = field(default=5e-3, metadata={"help": "Peak learning rate of the routers (trained in full)."})
    warmup: float = field(default=0.05, metadata={"help": "Warm-up fraction of the steps (then cosine decay to 0)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL-to-teacher loss."})
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of KL(teacher || student)."})
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of the next-token cross-entropy (hard labels)."})
    balance_weight: float = field(default=0.01, metadata={"help": "Weight of the Switch load-balancing loss."})
    z_weight: float = field(default=0.001, metadata={"help": "Weight of the router z-loss."})
    skip_weight: float = field(default=0.1, metadata={"help": "Skip models: weight of the gate sparsity loss."})
    target_skip: float = field(default=0.0, metadata={"help": "Skip models: skip rate to reach (a hinge on the mean gate opening); 0: an L1 penalty on gate openings instead."})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank (0: train routers only)."})
    lora_alpha: float = field(default=128.0, metadata={"help": "LoRA alpha."})
    lora_targets: str = field(default="attention,experts", metadata={"help": "Where LoRA goes: attention, experts, or both (comma-separated)."})
    teacher: str = field(default="self", metadata={"help": "self: the dense path inside the student's frozen weights (no second model); or a model (alias, folder, .gguf, Hub id)."})
    eval_every: int = field(default=200, metadata={"help": "Held-out evaluation every N optimizer steps (0: only before and after)."})
    eval_tokens: str = field(default="128k", metadata={"help": "Held-out tokens used for evaluation."})
    checkpoint_every: int = field(default=200, metadata={"help": "Save a resumable checkpoint every N optimizer steps."})
    train_seed: int = field(default=0, metadata={"help": "Seed for the data order and the adapter initialisation."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."})

    @property
    def train_tokens(self) -> int:
        return parse_count(self.tokens)

    @property
    def heldout_tokens(self) -> int:
        return parse_count(self.eval_tokens)

    def sources(self, text: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in text.split(",") if part.strip())

    def validate(self) -> None:
        if not self.sources(self.data):
            raise SparsifyError("--data is required: a Hub dataset id or local text files")
        if self.seq_len < 2 or self.batch_size < 1 or self.grad_accum < 1:
            raise SparsifyError("--seq-len must be at least 2, --batch-size and --grad-accum at least 1")
        if not 0.0 <= self.target_skip < 1.0:
            raise SparsifyError("--target-skip must be in [0, 1)")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise SparsifyError("--precision must be auto, bf16 or fp32")
        self.train_tokens, self.heldout_tokens  # parse early: a bad count fails before any work
