"""Options of `--to moe` and `--to fine-moe`, and of training their routers.

Kept free of torch and transformers: the command line builds its flags from these dataclasses and
answers `--help` in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from sparsify.convert.calibration.options import CalibrationOptions
from sparsify.families import ROUTING_KINDS
from sparsify.option_values import check_layers_form, check_rules, require

SPLITS = ("contiguous", "random", "coactivation")
ROUTER_INITS = ("virtual-group", "random", "gate-mean", "calibrated")
CALIBRATED_SPLITS = ("coactivation",)


@dataclass
class ExpertInitOptions:
    """Options both `moe` and `fine-moe` take: which layers convert, and how new parameters are drawn."""

    layers: str = field(
        default="all",
        metadata={"help": "Which FFNs become MoE: all, later-half, or indices like 12-29; the others stay dense FFNs "
                          "(then the target is one with dense layers: Qwen2-MoE for llama, mistral and qwen2, Qwen3-MoE for qwen3)."},
    )

    reinit_ratio: float = field(
        default=0.0,
        metadata={"help": "Drop-Upcycling: fraction of the FFN neurons of copies 1..E-1 re-drawn at random (0 keeps the model exact)."},
    )
    router_std: float = field(default=0.02, metadata={"help": "Std of the random router initialisation."})
    seed: int = field(default=0, metadata={"help": "Seed for the router, the neuron split and re-initialisation."})
    routing: str | None = field(
        default=None,
        metadata={"help": "Router kind, which picks the target architecture: softmax (Mixtral, Qwen2-MoE, Qwen3-MoE) or "
                          "sigmoid (GLM-4.5-MoE: sigmoid scores plus a per-expert selection bias that sparsify train moves "
                          "towards equal load, --bias-rate; the balance loss stays on unless --balance-weight 0). Default: "
                          "softmax where the family has such a target (qwen3 with --shared-experts has only sigmoid)."},
    )

    def validate(self) -> None:
        """What can be checked without the model (called before it is opened); the plan checks the rest."""
        require(0.0 <= self.reinit_ratio < 1.0, f"--reinit-ratio must be in [0, 1), got {self.reinit_ratio}")
        check_layers_form(self.layers)  # the model's layer count is checked at conversion
        require(self.router_std > 0, f"--router-std must be greater than 0, got {self.router_std}")
        require(self.routing is None or self.routing in ROUTING_KINDS,
                f"--routing must be one of {', '.join(ROUTING_KINDS)}, got '{self.routing}'")


@dataclass
class MoeOptions(ExpertInitOptions):
    tags: ClassVar[tuple[str, ...]] = ("sparse-upcycling",)
    experts: int = field(default=8, metadata={"help": "Number of experts; each starts as a copy of the FFN."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to."})

    def validate(self) -> None:
        super().validate()
        require(self.experts >= 1, f"--experts must be at least 1, got {self.experts}")
        require(1 <= self.top_k <= self.experts, f"top-k {self.top_k} must be between 1 and the number of experts, {self.experts}")

    def layout(self):
        from sparsify.convert.moe.experts import ExpertLayout

        return ExpertLayout(
            copies=self.experts,
            granularity=1,
            top_k=self.top_k,
            reinit_ratio=self.reinit_ratio,
            router_std=self.router_std,
            seed=self.seed,
        )


@dataclass
class FineMoeOptions(ExpertInitOptions, CalibrationOptions):
    tags: ClassVar[tuple[str, ...]] = ("fine-grained-moe",)
    granularity: int = field(default=8, metadata={"help": "G: split each FFN into G experts of d_ff/G neurons."})
    experts: int = field(default=1, metadata={"help": "E: copies of the FFN; the model gets E*G experts."})
    top_k: int | None = field(default=None, metadata={"help": "Routed experts per token; default all of one copy (the dense FFN compute)."})
    shared_experts: int = field(
        default=0,
        metadata={"help": "S of the G partitions become one shared expert every token computes (the most important neurons "
                          "by calibration, or the first S partitions); the other G-S are routed. Needs a target with shared "
                          "experts: Qwen2-MoE for llama, mistral and qwen2; GLM-4.5-MoE for qwen3 or with --routing sigmoid."},
    )
    split: str | None = field(
        default=None,
        metadata={"help": "How neurons are assigned to partitions: contiguous, random (seeded permutation) or coactivation "
                          "(neurons that matter for the same calibration tokens go together; needs --calibration-data); "
                          "default: coactivation with --calibration-data, else contiguous."},
    )
    router_init: str | None = field(
        default=None,
        metadata={
            "help": "virtual-group (a copy's experts share a router row; exact when top-k covers whole copies), random, "
            "gate-mean (partition g's row is the mean of its neurons' gate rows) or calibrated (rows fitted to rank each "
            "token's experts by their output size on the calibration text); default: virtual-group when exact, else "
            "calibrated with --calibration-data, else gate-mean."
        },
    )

    @property
    def chosen_split(self) -> str:
        return self.split or ("coactivation" if self.calibrated else "contiguous")

    def validate(self) -> None:
        super().validate()
        require(self.granularity >= 1 and self.experts >= 1,
                 f"--granularity and --experts must be at least 1, got {self.granularity} and {self.experts}")
        require(0 <= self.shared_experts < self.granularity,
                f"--shared-experts {self.shared_experts} must be at least 0 and below the granularity {self.granularity} "
                "(at least one partition must stay routed)")
        routed = (self.granularity - self.shared_experts) * self.experts
        shape = (f"{self.experts} copies x granularity {self.granularity}" if not self.shared_experts
                 else f"{self.experts} copies x (granularity {self.granularity} - {self.shared_experts} shared)")
        require(self.top_k is None or 1 <= self.top_k <= routed,
                 f"top-k {self.top_k} must be between 1 and the number of {'routed ' if self.shared_experts else ''}experts, {routed} ({shape})")
        require(self.split is None or self.split in SPLITS, f"--split must be one of {', '.join(SPLITS)}, got '{self.split}'")
        require(self.router_init is None or self.router_init in ROUTER_INITS,
                 f"--router-init must be one of {', '.join(ROUTER_INITS)}, got '{self.router_init}'")
        needs_data = self.chosen_split in CALIBRATED_SPLITS or self.router_init == "calibrated"
        require(self.calibrated or not needs_data,
                f"{'--split ' + self.chosen_split if self.chosen_split in CALIBRATED_SPLITS else '--router-init calibrated'} measures "
                "the dense model on text: pass --calibration-data FILES (e.g. some of your training text)")
        require(not (self.router_init == "calibrated" and self.experts > 1),
                "--router-init calibrated fits one copy's router: with --experts > 1 the copies' rows tie and top-k picks the "
                "same partition twice; use --experts 1 (or another --router-init)")
        self.validate_calibration()

    def layout(self):
        from sparsify.convert.moe.experts import ExpertLayout

        routed = self.granularity - self.shared_experts
        top_k = routed if self.top_k is None else self.top_k
        default_init = "virtual-group" if top_k % routed == 0 else ("calibrated" if self.calibrated and self.experts == 1 else "gate-mean")
        return ExpertLayout(
            copies=self.experts,
            granularity=self.granularity,
            top_k=top_k,
            shared=self.shared_experts,
            split=self.chosen_split,
            reinit_ratio=self.reinit_ratio,
            router_init=self.router_init or default_init,
            router_std=self.router_std,
            seed=self.seed,
        )


@dataclass
class MoeTrainOptions:
    """Router training of MoE models: the auxiliary losses (recipe section `train.moe`)."""

    section: ClassVar[str] = "moe"
    balance_weight: float = field(default=0.01, metadata={"help": "Weight of the Switch load-balancing loss."})
    z_weight: float = field(default=0.001, metadata={"help": "Weight of the router z-loss."})
    bias_rate: float = field(
        default=1e-3,
        metadata={"help": "Loss-free balancing, for routers with a selection bias (--routing sigmoid): after every step each "
                          "expert's bias moves by this much towards equal load (DeepSeek-V3's rate); 0 keeps the biases fixed."},
    )

    def validate(self) -> None:
        check_rules(self, (("balance_weight", lambda v: v >= 0, "must be 0 or more"), ("z_weight", lambda v: v >= 0, "must be 0 or more"),
                           ("bias_rate", lambda v: v >= 0, "must be 0 or more")))
