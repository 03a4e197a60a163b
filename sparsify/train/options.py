"""Everything a training run is configured by. The CLI builds its `train` flags from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsify.errors import SparsifyError
from sparsify.option_values import check_rules, dtype_name, parse_count, parse_list, parse_numbers  # noqa: F401 - re-exported


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
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32 (bfloat16, float32 also read)."})

    @property
    def train_tokens(self) -> int:
        return parse_count(self.tokens)

    @property
    def heldout_tokens(self) -> int:
        return parse_count(self.eval_tokens)

    def sources(self, text: str) -> tuple[str, ...]:
        return tuple(parse_list(text))

    def validate(self) -> None:
        """Refuse bad options before any model or data is loaded (nothing is read but file names)."""
        from sparsify.text_files import check_sources

        if not self.sources(self.data):
            raise SparsifyError("--data is required: a Hub dataset id or local text files")
        check_rules(self, _RULES)
        dtype_name(self.precision, "--precision", ("float32", "bfloat16"))
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise SparsifyError("--kl-weight and --ce-weight are both 0: nothing would tie the model to its teacher or to the text")
        unknown = set(self.sources(self.lora_targets)) - set(LORA_TARGETS)
        if unknown or not self.sources(self.lora_targets):
            raise SparsifyError(f"--lora-targets must name {' and/or '.join(LORA_TARGETS)} (comma-separated), not '{self.lora_targets}'")
        if self.train_tokens < 1:
            raise SparsifyError(f"--tokens {self.tokens}: train on at least one token (e.g. --tokens 5M)")
        if self.heldout_tokens < self.seq_len:
            raise SparsifyError(
                f"--eval-tokens {self.eval_tokens} is less than one --seq-len block ({self.seq_len} tokens); the held-out "
                "evaluation needs at least one"
            )
        check_sources(self.sources(self.data), "--data")
        check_sources(self.sources(self.eval_data), "--eval-data")
        if self.teacher != "self":
            from sparsify.sources import check_model_ref

            check_model_ref(self.teacher, "--teacher")  # before `upcycle --train` converts, too


LORA_TARGETS = ("attention", "experts")
_POSITIVE, _NON_NEGATIVE = "must be greater than 0", "must be 0 or more"
# (field, accepts, what the rule is): numeric options a run cannot sensibly take.
_RULES = (
    ("seq_len", lambda v: v >= 2, "must be at least 2"),
    ("batch_size", lambda v: v >= 1, "must be at least 1"),
    ("grad_accum", lambda v: v >= 1, "must be at least 1"),
    ("lr", lambda v: v > 0, _POSITIVE),
    ("router_lr", lambda v: v > 0, _POSITIVE),
    ("warmup", lambda v: 0 <= v < 1, "is a fraction of the steps: 0 or more and below 1"),
    ("weight_decay", lambda v: v >= 0, _NON_NEGATIVE),
    ("max_grad_norm", lambda v: v >= 0, f"{_NON_NEGATIVE} (0 disables clipping)"),
    ("temperature", lambda v: v > 0, _POSITIVE),
    ("kl_weight", lambda v: v >= 0, _NON_NEGATIVE),
    ("ce_weight", lambda v: v >= 0, _NON_NEGATIVE),
    ("balance_weight", lambda v: v >= 0, _NON_NEGATIVE),
    ("z_weight", lambda v: v >= 0, _NON_NEGATIVE),
    ("skip_weight", lambda v: v >= 0, _NON_NEGATIVE),
    ("target_skip", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("lora_rank", lambda v: v >= 0, f"{_NON_NEGATIVE} (0 trains the routers or gates only)"),
    ("lora_alpha", lambda v: v > 0, _POSITIVE),
    ("eval_every", lambda v: v >= 0, f"{_NON_NEGATIVE} (0: evaluate only before and after)"),
    ("checkpoint_every", lambda v: v >= 0, f"{_NON_NEGATIVE} (0: no intermediate checkpoints)"),
)
