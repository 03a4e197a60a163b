"""Every converter's options, as dataclasses whose fields become `sparsify upcycle` flags.

Kept free of torch and transformers (plans are imported only when a conversion runs), so that
the CLI can build its flags and answer `--help` in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExpertInitOptions:
    """Options both `moe` and `fine-moe` take: how new parameters are drawn."""

    reinit_ratio: float = field(
        default=0.0,
        metadata={"help": "Drop-Upcycling: fraction of the FFN neurons of copies 1..E-1 re-drawn at random (0 keeps the model exact)."},
    )
    router_std: float = field(default=0.02, metadata={"help": "Std of the random router initialisation."})
    seed: int = field(default=0, metadata={"help": "Seed for the router, the neuron split and re-initialisation."})


@dataclass
class MoeOptions(ExpertInitOptions):
    experts: int = field(default=8, metadata={"help": "Number of experts; each starts as a copy of the FFN."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to."})

    def layout(self):
        from sparsify.convert.experts import ExpertLayout

        return ExpertLayout(
            copies=self.experts,
            granularity=1,
            top_k=self.top_k,
            reinit_ratio=self.reinit_ratio,
            router_std=self.router_std,
            seed=self.seed,
        )


@dataclass
class FineMoeOptions(ExpertInitOptions):
    granularity: int = field(default=8, metadata={"help": "G: split each FFN into G experts of d_ff/G neurons."})
    experts: int = field(default=1, metadata={"help": "E: copies of the FFN; the model gets E*G experts."})
    top_k: int | None = field(default=None, metadata={"help": "Experts per token; default G (the dense FFN compute)."})
    split: str = field(
        default="contiguous",
        metadata={"help": "How neurons are assigned to partitions: contiguous or random (seeded permutation)."},
    )
    router_init: str | None = field(
        default=None,
        metadata={
            "help": "virtual-group (a copy's experts share a router row; exact when G divides top-k), random, or "
            "gate-mean (partition g's row is the mean of its neurons' gate rows); default: virtual-group when "
            "G divides top-k, else gate-mean."
        },
    )

    def layout(self):
        from sparsify.convert.experts import ExpertLayout

        top_k = self.granularity if self.top_k is None else self.top_k
        router_init = self.router_init or ("virtual-group" if top_k % self.granularity == 0 else "gate-mean")
        return ExpertLayout(
            copies=self.experts,
            granularity=self.granularity,
            top_k=top_k,
            split=self.split,
            reinit_ratio=self.reinit_ratio,
            router_init=router_init,
            router_std=self.router_std,
            seed=self.seed,
        )


@dataclass
class SkipOptions:
    gates: str = field(default="both", metadata={"help": "Which sublayers get a gate: both, attention or ffn."})
    exclude_first: int = field(default=0, metadata={"help": "Leave the first N layers ungated (always run)."})
    exclude_last: int = field(default=0, metadata={"help": "Leave the last N layers ungated (always run)."})
    threshold: float = field(default=0.5, metadata={"help": "Inference threshold: a sublayer runs for a token when its gate's probability exceeds it (adjustable after training)."})
    gate_bias_init: float = field(default=6.0, metadata={"help": "Initial gate bias: sigmoid(6) = 0.998, every gate open, the model exact."})
