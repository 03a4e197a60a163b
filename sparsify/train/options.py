"""Everything a training run is configured by, in groups that map one to one onto recipe sections.

`data`, `optimisation`, `lora`, `distillation` and `run` are the loop's own; each variant adds its
group (`moe`: the router losses, `skip`: the gate sparsity loss) through the registry. The command
line keeps flat flags (`--lr`, `--balance-weight`): every field name is unique across the groups,
and `TrainOptions.of(**flat)` / `.flat()` convert. Torch-free, like the registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from sparsify.convert import train_option_groups
from sparsify.convert.variant import UNTUNED_LEARNING_RATES, LearningRates
from sparsify.errors import SparsifyError
from sparsify.option_values import check_rules, dtype_name, parse_count, parse_list

LORA_TARGETS = ("attention", "experts")
EXPERT_TRAINING = ("lora", "full")
_POSITIVE, _NON_NEGATIVE = "must be greater than 0", "must be 0 or more"


@dataclass
class DataOptions:
    data: str = field(default="", metadata={"help": "Training text: Hub dataset id, or files/globs (txt, jsonl, parquet, .gz), comma-separated."})
    eval_data: str = field(default="", metadata={"help": "Held-out text (same forms); default: a hashed 1% of --data that training never sees."})
    text_field: str = field(default="text", metadata={"help": "Column holding the text in jsonl/parquet/Hub data."})
    tokens: str = field(default="5M", metadata={"help": "Training tokens (e.g. 20M); the corpus repeats, reshuffled, if shorter."})
    seq_len: int = field(default=1024, metadata={"help": "Tokens per training block."})
    eval_tokens: str = field(default="128k", metadata={"help": "Held-out tokens used for evaluation."})

    @property
    def train_tokens(self) -> int:
        return parse_count(self.tokens)

    @property
    def heldout_tokens(self) -> int:
        return parse_count(self.eval_tokens)

    @property
    def train_sources(self) -> tuple[str, ...]:
        return tuple(parse_list(self.data))

    @property
    def heldout_sources(self) -> tuple[str, ...]:
        return tuple(parse_list(self.eval_data))

    def validate(self) -> None:
        if not self.train_sources:
            raise SparsifyError("--data is required: a Hub dataset id or local text files")
        check_rules(self, (("seq_len", lambda v: v >= 2, "must be at least 2"),))
        if self.train_tokens < 1:
            raise SparsifyError(f"--tokens {self.tokens}: train on at least one token (e.g. --tokens 5M)")
        if self.heldout_tokens < self.seq_len:
            raise SparsifyError(
                f"--eval-tokens {self.eval_tokens} is less than one --seq-len block ({self.seq_len} tokens); the held-out "
                "evaluation needs at least one"
            )

    def check_inputs(self) -> None:
        from sparsify.text_files import check_sources

        check_sources(self.train_sources, "--data")
        check_sources(self.heldout_sources, "--eval-data")


@dataclass
class OptimisationOptions:
    batch_size: int = field(default=8, metadata={"help": "Blocks per micro-batch per device."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: float | None = field(default=None, metadata={"help": "Peak learning rate of the LoRA adapters; auto: the rate tuned for the model's variant (2e-3 fine-moe and prune, else 1e-3)."})
    router_lr: float | None = field(default=None, metadata={"help": "Peak learning rate of the routers or gates (trained in full); auto: the rate tuned for the model's variant (1e-2 fine-moe, else 5e-3)."})
    expert_lr: float = field(default=1e-4, metadata={"help": "Peak learning rate of the expert weights with --train-experts full (not tuned yet)."})
    warmup: float = field(default=0.05, metadata={"help": "Warm-up fraction of the steps, at least 10 steps (at most a quarter of them) unless 0 (then cosine decay to 0)."})
    router_first: float = field(default=0.0, metadata={"help": "Fraction of the steps that train only the routers or gates, adapters frozen; the adapters then warm up and decay over the rest."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    train_seed: int = field(default=0, metadata={"help": "Seed for the data order and the adapter initialisation."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32 (bfloat16, float32 also read)."})

    def validate(self) -> None:
        check_rules(self, (
            ("batch_size", lambda v: v >= 1, "must be at least 1"),
            ("grad_accum", lambda v: v >= 1, "must be at least 1"),
            ("lr", lambda v: v is None or v > 0, _POSITIVE),
            ("router_lr", lambda v: v is None or v > 0, _POSITIVE),
            ("expert_lr", lambda v: v > 0, _POSITIVE),
            ("warmup", lambda v: 0 <= v < 1, "is a fraction of the steps: 0 or more and below 1"),
            ("router_first", lambda v: 0 <= v < 1, "is a fraction of the steps: 0 or more and below 1 (the adapters need some)"),
            ("weight_decay", lambda v: v >= 0, _NON_NEGATIVE),
            ("max_grad_norm", lambda v: v >= 0, f"{_NON_NEGATIVE} (0 disables clipping)"),
        ))
        dtype_name(self.precision, "--precision", ("float32", "bfloat16"))


@dataclass
class LoraOptions:
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank (0: train the routers or gates only)."})
    lora_alpha: float = field(default=128.0, metadata={"help": "LoRA alpha."})
    lora_targets: str = field(default="attention,experts", metadata={"help": "Where LoRA goes: attention, experts, or both (comma-separated)."})
    train_experts: str = field(
        default="lora",
        metadata={"help": "How the experts train (an MoE's routed and shared experts, a dense model's FFN): lora (adapters, where "
                          "--lora-targets names experts) or full (their weights themselves, fp32 master copy, at --expert-lr), "
                          "which lets an upcycled MoE's copies diverge and gain capacity. full changes the weights that hold the "
                          "dense teacher, so the source model is the teacher."},
    )

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(parse_list(self.lora_targets))

    def validate(self) -> None:
        check_rules(self, (
            ("lora_rank", lambda v: v >= 0, f"{_NON_NEGATIVE} (0 trains the routers or gates only)"),
            ("lora_alpha", lambda v: v > 0, _POSITIVE),
        ))
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown or not self.targets:
            raise SparsifyError(f"--lora-targets must name {' and/or '.join(LORA_TARGETS)} (comma-separated), not '{self.lora_targets}'")
        if self.train_experts not in EXPERT_TRAINING:
            raise SparsifyError(f"--train-experts must be one of {', '.join(EXPERT_TRAINING)}, not '{self.train_experts}'")

    @property
    def full_experts(self) -> bool:
        return self.train_experts == "full"

    @property
    def adapter_targets(self) -> tuple[str, ...]:
        """--lora-targets, less the experts when they train in full."""
        return tuple(t for t in self.targets if not (t == "experts" and self.full_experts))


DIVERGENCE_NAMES = ("kl", "tvd", "top1")  # sparsify/train/losses.py DIVERGENCES (this module stays torch-free)


@dataclass
class DistillationOptions:
    teacher: str = field(default="self", metadata={"help": "self: the dense path inside the student's frozen weights (no second model); or a model (alias, folder, .gguf, Hub id)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the divergence to the teacher."})
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of the divergence to the teacher (--divergence; KL(teacher || student) by default)."})
    divergence: str = field(
        default="kl",
        metadata={"help": "How the student is tied to its teacher: kl (KL(teacher || student)); tvd (total variation, the "
                          "chance that speculative sampling rejects the student's draft); top1 (cross-entropy on the teacher's "
                          "most likely token, what greedy speculative decoding accepts). Skip models trained as drafts: tvd or top1."},
    )
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of the next-token cross-entropy (hard labels)."})
    hidden_weight: float = field(default=0.0, metadata={"help": "Weight of the per-layer FFN-output loss against the teacher (MSE over the teacher's mean square, averaged over layers)."})
    cache_teacher: str = field(
        default="",
        metadata={"help": "Folder for the teacher's top-k log-probabilities of every training block, computed the first time a "
                          "block is seen and reused across epochs, resumptions and runs on the same data and teacher (about "
                          "6 bytes x --cache-top-k per training token); the KL then runs against it. Empty: the teacher runs every step."},
    )
    cache_top_k: int = field(default=64, metadata={"help": "Teacher log-probabilities kept per token in --cache-teacher; the rest count as one tail outcome."})

    def validate(self) -> None:
        check_rules(self, (
            ("temperature", lambda v: v > 0, _POSITIVE),
            ("kl_weight", lambda v: v >= 0, _NON_NEGATIVE),
            ("ce_weight", lambda v: v >= 0, _NON_NEGATIVE),
            ("hidden_weight", lambda v: v >= 0, _NON_NEGATIVE),
            ("cache_top_k", lambda v: v >= 1, "must be at least 1"),
        ))
        if self.kl_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise SparsifyError("--kl-weight, --ce-weight and --hidden-weight are all 0: nothing would tie the model to its teacher or to the text")
        if self.divergence not in DIVERGENCE_NAMES:
            raise SparsifyError(f"--divergence must be one of {', '.join(DIVERGENCE_NAMES)}, not '{self.divergence}'")
        if self.cache_teacher and self.divergence != "kl":
            raise SparsifyError(f"--cache-teacher stores the teacher's top-k log-probabilities, which give the KL only; "
                                f"--divergence {self.divergence} needs the teacher's forward pass every step: drop one of them")
        if self.cache_teacher and self.hidden_weight > 0:
            raise SparsifyError("--cache-teacher stores logits only, while --hidden-weight needs the teacher's forward pass every step; drop one of them")

    def check_inputs(self) -> None:
        if self.teacher != "self":
            from sparsify.sources import check_model_ref

            check_model_ref(self.teacher, "--teacher")  # before `upcycle --train` converts, too


@dataclass
class RunOptions:
    eval_every: int = field(default=200, metadata={"help": "Held-out evaluation every N optimizer steps (0: only before and after)."})
    checkpoint_every: int = field(default=200, metadata={"help": "Save a resumable checkpoint every N optimizer steps."})

    def validate(self) -> None:
        check_rules(self, (
            ("eval_every", lambda v: v >= 0, f"{_NON_NEGATIVE} (0: evaluate only before and after)"),
            ("checkpoint_every", lambda v: v >= 0, f"{_NON_NEGATIVE} (0: no intermediate checkpoints)"),
        ))


# The loop's own groups, by section name, in the order the command line shows them.
GROUPS: dict[str, type] = {
    "data": DataOptions, "optimisation": OptimisationOptions, "lora": LoraOptions, "distillation": DistillationOptions, "run": RunOptions,
}


def _variant_groups() -> dict[str, Any]:
    return {section: cls() for section, cls in train_option_groups().items()}


@dataclass
class TrainOptions:
    data: DataOptions = field(default_factory=DataOptions)
    optimisation: OptimisationOptions = field(default_factory=OptimisationOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    distillation: DistillationOptions = field(default_factory=DistillationOptions)
    run: RunOptions = field(default_factory=RunOptions)
    variants: dict[str, Any] = field(default_factory=_variant_groups)  # section -> the variant's training options

    @staticmethod
    def sections() -> dict[str, type]:
        """Every group, the loop's then the variants', by section name."""
        return {**GROUPS, **train_option_groups()}

    @classmethod
    def of(cls, **flat: Any) -> TrainOptions:
        """From flat values (`lr=...`, `balance_weight=...`), as the command line gives them."""
        groups, taken = {}, set()
        for section, group in cls.sections().items():
            names = {f.name for f in fields(group)}
            groups[section] = group(**{k: v for k, v in flat.items() if k in names})
            taken |= names
        unknown = sorted(set(flat) - taken)
        if unknown:
            raise SparsifyError(f"unknown training option{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        return cls(**{section: groups.pop(section) for section in GROUPS}, variants=groups)

    def groups(self) -> dict[str, Any]:
        return {**{section: getattr(self, section) for section in GROUPS}, **self.variants}

    def flat(self) -> dict[str, Any]:
        """Every option by its flag name: what sparsify.json and checkpoints record."""
        return {name: value for group in self.groups().values() for name, value in asdict(group).items()}

    def with_learning_rates(self, rates: LearningRates | None) -> TrainOptions:
        """--lr and --router-lr where given, else the variant's tuned rates (the untuned ones without a variant):
        what the run uses, records in sparsify.json and compares on --resume."""
        rates = rates or UNTUNED_LEARNING_RATES
        given = self.optimisation
        resolved = replace(given, lr=rates.adapters if given.lr is None else given.lr,
                           router_lr=rates.decisions if given.router_lr is None else given.router_lr)
        return replace(self, optimisation=resolved)

    def validate(self) -> None:
        """Refuse bad options before any model or data is loaded (nothing is read but file names)."""
        groups = self.groups().values()
        for group in groups:
            group.validate()
        for group in groups:  # the files and models named, once every value is known to be sound
            if hasattr(group, "check_inputs"):
                group.check_inputs()

    @property
    def tokens_per_step_per_process(self) -> int:
        return self.optimisation.batch_size * self.data.seq_len * self.optimisation.grad_accum
