"""PNG plots of routing: expert load per layer as a heatmap (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def routing_plots(routing: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    moe = routing.get("moe")
    if moe:
        # Load relative to a perfectly even split: 1.0 everywhere means balanced experts.
        rows = []
        for layer in moe["layers"]:
            total = sum(layer["load"]) or 1
            rows.append([count * len(layer["load"]) / total for count in layer["load"]])
        figure, axis = plt.subplots(figsize=(max(6.0, 0.25 * moe["num_experts"] + 2), max(3.5, 0.22 * len(rows) + 1.5)))
        image = axis.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest")
        axis.set_xlabel("expert")
        axis.set_ylabel("layer")
        axis.set_title(f"tokens per expert / even share\n({moe['tokens']:,} tokens, top-{moe['top_k']} of {moe['num_experts']})", fontsize=10)
        figure.colorbar(image, ax=axis)
        figure.tight_layout()
        path = folder / "routing_load.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    skip = routing.get("skip")
    if skip:
        figure, axis = plt.subplots(figsize=(7.0, 3.5))
        for sublayer in skip["skip_rate_by_sublayer"]:
            rows = [row for row in skip["sublayers"] if row["sublayer"] == sublayer]
            axis.plot([row["layer"] for row in rows], [row["skip_rate"] for row in rows], marker="o", label=sublayer)
        axis.set_xlabel("layer")
        axis.set_ylabel("tokens skipping the sublayer")
        axis.set_ylim(0, 1)
        axis.set_title(f"skip rate per sublayer (threshold {skip['threshold']}, {skip['tokens']:,} tokens)", fontsize=10)
        axis.legend()
        figure.tight_layout()
        path = folder / "skip_rates.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
