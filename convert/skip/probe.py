"""The skip probe: the fraction of tokens that skip each gated sublayer, and the FLOPs that leaves."""

from __future__ import annotations

from typing import Any

from torch import nn

from sparsify.eval.probes import Probe


class SkipGateProbe(Probe):
    """Layer-skip gates: the fraction of tokens that skip each gated attention and FFN sublayer."""

    kind = "skip"
    flops_key = "total_with_skips"

    def __init__(self, gates: list[tuple[int, str, nn.Module]]):
        super().__init__([gate for _, _, gate in gates])
        self.gates = gates
        self.reset()

    @classmethod
    def find(cls, model: nn.Module) -> SkipGateProbe | None:
        gates = model.skip_gates() if hasattr(model, "skip_gates") else []
        return cls(gates) if gates else None

    def reset(self) -> None:
        self.skipped, self.seen = [0] * len(self.gates), [0] * len(self.gates)

    def _record(self, index: int, output: Any) -> None:
        keep = output[1]
        self.skipped[index] += int((keep == 0).sum())
        self.seen[index] += keep.numel()

    def summary(self) -> dict[str, Any]:
        rows = [
            {"layer": layer, "sublayer": sublayer, "skip_rate": self.skipped[i] / max(self.seen[i], 1)}
            for i, (layer, sublayer, _) in enumerate(self.gates)
        ]
        by_sublayer = {}
        for sublayer in dict.fromkeys(row["sublayer"] for row in rows):
            picked = [i for i, row in enumerate(rows) if row["sublayer"] == sublayer]
            by_sublayer[sublayer] = sum(self.skipped[i] for i in picked) / max(sum(self.seen[i] for i in picked), 1)
        return {
            "kind": self.kind,
            "threshold": float(self.gates[0][2].threshold),
            "tokens": self.seen[0] if self.seen else 0,
            "sublayers": rows,
            "skip_rate": sum(self.skipped) / max(sum(self.seen), 1),
            "skip_rate_by_sublayer": by_sublayer,
        }

    @staticmethod
    def flops_at_activity(model: nn.Module, flops: dict[str, float], summary: dict[str, Any]) -> float:
        """Forward FLOPs per token once the measured skip rates are taken off. A skipped attention
        sublayer still computes keys and values (the KV-cache rule), so it saves its query and output
        projections and its share of the attention scores; a skipped FFN saves all of it."""
        config = model.config
        per_layer_attention = flops["attention"] / config.num_hidden_layers
        saved = 0.0
        for row in summary["sublayers"]:
            layer = model.model.layers[row["layer"]]
            if row["sublayer"] == "attention":
                attention = layer.self_attn
                saved += row["skip_rate"] * (2 * (attention.q_proj.weight.numel() + attention.o_proj.weight.numel()) + per_layer_attention)
            else:
                saved += row["skip_rate"] * 2 * sum(p.numel() for p in layer.mlp.parameters() if p.dim() >= 2)
        return flops["total"] - saved
