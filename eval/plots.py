"""PNG plots of what a model's sparse decisions did (matplotlib, headless): each variant's
description module draws its own kind of routing summary (expert load, skip rates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsify.convert import descriptions


def routing_plots(routing: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for module in descriptions():
        summary = routing.get(getattr(module, "ROUTING_KIND", None))
        if summary and hasattr(module, "routing_plot"):
            written.append(module.routing_plot(summary, folder, plt))
    return written
