"""Learning-rate schedules per parameter group, with an optional router-first phase.

Router-Tuning (see shared notes on conversion quality) trains the gating alone before anything else
moves: a converted model's experts are already close to the dense FFN, and what the first steps
should learn is which of them to use. With `--router-first F` the decisions (routers, gates) run
their usual warm-up and cosine over all steps, while the adapters hold still for the first F of the
steps and then get a warm-up and cosine of their own over the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


def cosine_with_warmup(start: int, warmup: int, end: int) -> Callable[[int], float]:
    """LR multiplier at scheduler step s: 0 before `start`, linear warm-up over `warmup` steps,
    then half a cosine down to 0 at `end` (transformers' cosine schedule, shifted to `start`)."""

    def multiplier(step: int) -> float:
        if step < start:
            return 0.0
        done = step - start
        if done < warmup:
            return done / max(1, warmup)
        progress = (done - warmup) / max(1, end - start - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return multiplier


# The fewest warm-up steps a run gets (up to a quarter of its steps), whatever --warmup's fraction gives.
# A fraction alone gives a short run none: `sparsify transition`'s 19-step run (300K tokens) warmed up
# over 1 step, and Adam's first full-rate steps, on second-moment estimates from one or two batches, took
# the KL from 0.36 to 1.44 at step 3 (H100, SmolLM2-135M later-half MoT, bench/results/mot_later_half_*).
MIN_WARMUP_STEPS = 10


def warmup_steps(fraction: float, steps: int) -> int:
    """Warm-up steps of a schedule over `steps`: the fraction of them, at least MIN_WARMUP_STEPS (at most a
    quarter of the steps); none when the fraction is 0 (asked for)."""
    if fraction <= 0:
        return 0
    return max(round(fraction * steps), min(MIN_WARMUP_STEPS, steps // 4))


@dataclass(frozen=True)
class Phases:
    """Where each group's schedule starts: the decisions at step 0, the adapters after the router-first steps."""

    total_steps: int
    warmup: float  # fraction of each group's own steps
    router_first: float = 0.0  # fraction of all steps in which only the decisions train

    @property
    def router_steps(self) -> int:
        return round(self.router_first * self.total_steps)

    def decisions(self) -> Callable[[int], float]:
        return cosine_with_warmup(0, warmup_steps(self.warmup, self.total_steps), self.total_steps)

    def adapters(self) -> Callable[[int], float]:
        start = self.router_steps
        return cosine_with_warmup(start, warmup_steps(self.warmup, self.total_steps - start), self.total_steps)

    def adapters_frozen(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is in the router-first phase."""
        return step <= self.router_steps
