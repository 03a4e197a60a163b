"""Closed-form repair of a converted FFN on the calibration tokens (`--refit`).

Once the routing is fixed (router rows, top-k), the routed FFN is linear in its down projections:

    FFN'(x) = D f(x),   f_n(x) = h_n(x)                      for a shared neuron n,
                        f_n(x) = h_n(x) * c * w_e(x)         for neuron n of routed expert e
                                                             (w_e: its routing weight, 0 unless chosen;
                                                              c: the expert scale on its down projection)

so the D closest to the dense FFN's output on the calibration tokens is a ridge regression,
    D^T = (F^T F + l I)^-1 (F^T Y + l D0^T),   Y = dense outputs, D0 = the dense down projection,
which shrinks towards the dense weights where the data says little. The dropped neurons' average
contribution moves into the neurons that stay (as pruning with reconstruction does, e.g.
SparseGPT's update). The same regression with no routing (a kept subset) repairs static pruning.
"""

from __future__ import annotations

from typing import Callable

import torch

from sparsify.convert.calibration.neurons import TOKENS_PER_CHUNK
from sparsify.convert.moe.routing import RouterSettings, dense_weights

REFIT_RIDGE = 1e-3  # relative to the mean diagonal of F^T F; one value tried so far (with 128k tokens it helps at every setting measured)
# Each output row of D has d_ff unknowns: with fewer calibration tokens than a few times d_ff the regression
# fits the calibration text, not the layer (SmolLM2-135M with 2k tokens for d_ff 1536: perplexity x5000).
TOKENS_PER_NEURON = 16


def refit_refusal(tokens: int, d_ff: int) -> str | None:
    """Why the down projections cannot be refitted on `tokens` calibration tokens, or None."""
    if tokens < TOKENS_PER_NEURON * d_ff:
        return (f"not refitted: {tokens:,} calibration tokens are fewer than {TOKENS_PER_NEURON} per FFN neuron "
                f"({TOKENS_PER_NEURON * d_ff:,}); pass more --calibration-tokens")
    return None


def routed_features(x: torch.Tensor, ffn: dict[str, torch.Tensor], shared_width: int, size: int, router: torch.Tensor | None,
                    top_k: int, scale: float, routing: str = "softmax") -> torch.Tensor:
    """f(x) (tokens, d_ff) for neurons in partition order (shared first, then expert after expert), with
    the target's routing weights (`routing`: its router kind, see routing.py)."""
    h = torch.nn.functional.silu(x @ ffn["gate"].T) * (x @ ffn["up"].T)
    if router is None:
        return h
    weights = dense_weights(x @ router.T, RouterSettings(routing, top_k)) * scale
    return torch.cat([h[:, :shared_width], h[:, shared_width:] * weights.repeat_interleave(size, dim=1)], dim=1)


def refit_down(x: torch.Tensor, ffn: dict[str, torch.Tensor], dense_down: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor],
               ridge: float = REFIT_RIDGE) -> torch.Tensor:
    """The down projection (hidden, neurons) that best reproduces `x`'s dense FFN outputs from `features(x)`.
    `ffn` is the dense FFN (its outputs are the targets); `dense_down` the starting point, (hidden, neurons)."""
    neurons = dense_down.shape[1]
    gram = torch.zeros(neurons, neurons, device=x.device, dtype=torch.float64)
    cross = torch.zeros(neurons, dense_down.shape[0], device=x.device, dtype=torch.float64)
    for start in range(0, x.shape[0], TOKENS_PER_CHUNK):
        chunk = x[start : start + TOKENS_PER_CHUNK]
        target = (torch.nn.functional.silu(chunk @ ffn["gate"].T) * (chunk @ ffn["up"].T)) @ ffn["down"].T
        f = features(chunk)
        gram += (f.T @ f).double()
        cross += (f.T @ target).double()
    strength = ridge * gram.diagonal().mean()
    gram.diagonal().add_(strength)  # in place: no d_ff x d_ff identity beside the Gram matrix
    solved = torch.linalg.solve(gram, cross + strength * dense_down.T.double())
    return solved.T.float()
