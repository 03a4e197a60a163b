"""Data-driven fine-grained experts: which neurons go together, which are always on, and how the
router starts (`--split coactivation`, after CMoE, Pei et al. 2025, and MoEfication, Zhang et al. 2022).

From one layer's calibration activity (see sparsify.convert.calibration):
1. Shared experts: the S*d_ff/G neurons with the largest mean importance E|h_n| |down_n| are
   computed for every token.
2. Routed experts: the other neurons are split into G-S equal groups of neurons that matter for the
   same tokens: balanced spherical k-means on each neuron's importance profile over sampled tokens.
   With K of G-S groups per token, a token loses least when its important neurons sit in few groups.
3. Router: logits should rank a token's groups by how much they add to its output, so each row is
   a ridge regression of the group's output norm |down_e h_e(x)| on the FFN input x, per token
   centred and scaled (only the ranking within a token matters). The rows are then scaled so the
   logits are small: the selected experts get near-equal weights (1/K each, times the expert
   scale K = their plain sum, which is what the dense FFN adds up) and training sharpens them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsify.convert.calibration.neurons import NeuronStatistics, importance, neuron_outputs
from sparsify.convert.calibration.runner import LayerActivity
from sparsify.convert.calibration.spill import TensorSpill
from sparsify.convert.moe.refit import refit_down, refit_refusal, routed_features

KMEANS_ITERATIONS = 20
# Std of the fitted router's logits over calibration tokens: small enough that the chosen experts'
# weights are near-equal (softmax or renormalised sigmoid), large enough to survive bf16. Set by that
# reasoning, not tuned yet.
ROUTER_LOGIT_STD = 0.1
RIDGE = 1e-2  # ridge strength relative to the mean eigenvalue of X^T X


@dataclass
class CalibratedSplit:
    order: torch.Tensor  # (d_ff,): shared neurons first, then routed group 0, 1, ...; each group d_ff/G neurons
    router: torch.Tensor  # (routed groups, hidden): router rows of one copy's routed experts
    figures: dict[str, float]  # what sparsify.json records about this layer
    down: Path | None = None  # the refitted down projection (hidden, d_ff) in `order`, before expert scaling, spilled to disk
    spill: TensorSpill | None = None

    def refitted_down(self) -> torch.Tensor | None:
        return None if self.down is None else self.spill.get(self.down)


def balanced_kmeans(profiles: torch.Tensor, clusters: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Cluster index per row of `profiles` (unit rows), every cluster exactly rows/clusters in size."""
    rows = profiles.shape[0]
    size = rows // clusters
    generator = torch.Generator().manual_seed(seed)
    centroids = profiles[torch.randperm(rows, generator=generator)[:clusters].to(profiles.device)]
    assignment = None
    for _ in range(iterations):
        similarity = (profiles @ centroids.T).cpu().numpy()
        new = _assign_balanced(similarity, size)
        if assignment is not None and np.array_equal(new, assignment):
            break
        assignment = new
        index = torch.from_numpy(assignment).to(profiles.device)
        sums = torch.zeros_like(centroids).index_add_(0, index, profiles)
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return torch.from_numpy(assignment)


def _assign_balanced(similarity: np.ndarray, size: int) -> np.ndarray:
    """Greedy balanced assignment: rows most sure of their best cluster choose first, each taking its
    most similar cluster that still has room."""
    rows, clusters = similarity.shape
    ranked = np.sort(similarity, axis=1)
    margin = ranked[:, -1] - ranked[:, -2] if clusters > 1 else ranked[:, -1]
    room = np.full(clusters, size)
    assignment = np.empty(rows, dtype=np.int64)
    for row in np.argsort(-margin, kind="stable"):
        choice = np.where(room > 0, similarity[row], -np.inf).argmax()
        assignment[row] = choice
        room[choice] -= 1
    return assignment


def group_output_norms(x: torch.Tensor, ffn: dict[str, torch.Tensor], groups: torch.Tensor) -> torch.Tensor:
    """|down_e h_e(x)| per token and routed group: (tokens, groups)."""
    count, size = groups.shape
    downs = ffn["down"][:, groups.reshape(-1)].T.reshape(count, size, -1)  # (groups, size, hidden)
    norms = []
    for h in neuron_outputs(x, ffn, chunk=max(1, (1 << 26) // (count * downs.shape[-1]))):
        per_group = h[:, groups.reshape(-1)].view(h.shape[0], count, size)
        norms.append(torch.einsum("tgs,gsh->tgh", per_group, downs).norm(dim=-1))
    return torch.cat(norms)


def ridge_fit(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """W (hidden, outputs) minimising |x W - target|^2 + RIDGE * mean eigenvalue of x^T x * |W|^2."""
    gram = x.T @ x
    ridge = RIDGE * gram.diagonal().mean()
    return torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], device=x.device, dtype=x.dtype), x.T @ target)


def coactivation_groups(statistics: NeuronStatistics, neurons: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`neurons` split into `count` equal groups of neurons that matter for the same tokens: (count, size)."""
    clusters = balanced_kmeans(statistics.profiles[neurons], count, seed).to(neurons.device)
    return torch.stack([neurons[clusters == c] for c in range(count)])


def fit_router(x: torch.Tensor, norms: torch.Tensor, logit_std: float = ROUTER_LOGIT_STD) -> torch.Tensor:
    """Rows W (groups, hidden) with x W^T ranking each token's groups like `norms` does."""
    target = norms - norms.mean(dim=1, keepdim=True)
    target = target / target.std(dim=1, keepdim=True).clamp_min(1e-12)
    rows = ridge_fit(x, target).T
    logits = x @ rows.T
    return rows * (logit_std / logits.std().clamp_min(1e-12))


def calibrated_split(activity: LayerActivity, layout: Any, seed: int, fixed_order: torch.Tensor | None = None,
                     refit: bool = False, spill: TensorSpill | None = None) -> CalibratedSplit:
    """Shared neurons, routed groups and router rows for one layer (see the module docstring); with
    `refit`, also the down projections re-solved for that routing (refit.py). With `fixed_order`
    (a contiguous or random split) the groups are kept and only the router (and down) is fitted.
    Sets `activity.converted_ffn`, so the next layer is calibrated on the converted model's activations."""
    x, ffn = activity.ffn_input, activity.ffn
    granularity, shared, top_k = layout.granularity, layout.shared, layout.top_k
    d_ff = ffn["gate"].shape[0]
    size = d_ff // granularity
    statistics = NeuronStatistics.measure(x, ffn)
    if fixed_order is None:
        by_importance = statistics.mean_importance.argsort(descending=True)
        shared_neurons = by_importance[: shared * size].sort().values
        routed = by_importance[shared * size :].sort().values
        groups = coactivation_groups(statistics, routed, granularity - shared, seed)  # (groups, size)
    else:
        fixed_order = fixed_order.to(x.device)
        shared_neurons, groups = fixed_order[: shared * size], fixed_order[shared * size :].view(granularity - shared, size)
    norms = group_output_norms(x, ffn, groups)
    router = fit_router(x, norms)
    order = torch.cat([shared_neurons, groups.reshape(-1)])
    split = CalibratedSplit(order.cpu(), router.cpu(), _figures(x, ffn, statistics, shared_neurons, groups, norms, router, top_k))
    ordered = {"gate": ffn["gate"][order], "up": ffn["up"][order], "down": ffn["down"][:, order]}
    routed_top_k = min(top_k, granularity - shared)

    def features(chunk: torch.Tensor) -> torch.Tensor:
        return routed_features(chunk, ordered, shared * size, size, router, routed_top_k, layout.expert_scale, layout.routing)

    if layout.router_init != "calibrated":
        return split  # the features model the fitted router only; later layers then see dense activations
    down = ordered["down"]
    if refit:
        down = refit_down(x, ffn, ordered["down"], features)
        split.down, split.spill = spill.put(f"down-{activity.layer}", down), spill
    activity.converted_ffn = lambda inputs: torch.cat([features(c) @ down.T for c in inputs.split(4096)])
    return split


def _figures(x, ffn, statistics: NeuronStatistics, shared_neurons, groups, norms, router, top_k: int) -> dict[str, Any]:
    """How much of the FFN a token keeps at step 0: importance share of the shared neurons, and of
    the routed importance, the share in the K groups the router picks vs the best K groups."""
    total = statistics.mean_importance.sum()
    routed_importance = []
    for chunk in importance(x, ffn):
        routed_importance.append(chunk[:, groups.reshape(-1)].view(chunk.shape[0], *groups.shape).sum(-1))
    per_group = torch.cat(routed_importance)  # (tokens, groups)
    picked = (x @ router.T).topk(min(top_k, groups.shape[0]), dim=1).indices
    best = per_group.topk(min(top_k, groups.shape[0]), dim=1).values.sum(1)
    routed_total = per_group.sum(1).clamp_min(1e-30)
    return {
        "shared_importance_share": float(statistics.mean_importance[shared_neurons].sum() / total),
        "routed_share_router": float((per_group.gather(1, picked).sum(1) / routed_total).mean()),
        "routed_share_best": float((best / routed_total).mean()),
        "router_top1_match": float((picked[:, 0] == norms.argmax(1)).float().mean()),
    }


def calibrate_layers(source: Any, options: Any, layout: Any, on_progress=lambda stage, done, total: None,
                     refit: bool = False, layers: list[int] | None = None) -> tuple[list[CalibratedSplit | None], str | None]:
    """Every layer's calibrated split up to the last of `layers` (None for a layer outside them, which stays dense), computed while
    the model runs layer by layer on `options`' calibration text (a CalibrationOptions), each layer seeing
    the layers before it converted; and why the down projections were not refitted although asked (too
    few tokens), or None."""
    from sparsify.convert.calibration.runner import calibration_blocks, layer_activity
    from sparsify.convert.moe.experts import neuron_order

    blocks = calibration_blocks(source, options)
    refusal = refit_refusal(blocks.numel(), int(source.config.intermediate_size)) if refit else None
    refit = refit and refusal is None
    last = int(source.config.num_hidden_layers) - 1 if layers is None else max(layers)
    on_progress("calibrating", 0, last + 1)
    spill = TensorSpill() if refit else None
    splits = []
    for activity in layer_activity(source, blocks, on_layer=lambda done, total: on_progress("calibrating", done, last + 1)):
        if layers is not None and activity.layer not in layers:
            splits.append(None)  # a dense layer: the next one sees its dense output
            continue
        d_ff = activity.ffn["gate"].shape[0]
        fixed = None
        if layout.split != "coactivation":
            fixed = neuron_order(layout, activity.layer, d_ff)
            fixed = torch.arange(d_ff) if fixed is None else fixed
        splits.append(calibrated_split(activity, layout, seed=layout.seed * 1009 + activity.layer, fixed_order=fixed,
                                       refit=refit, spill=spill))
        if activity.layer == last:
            break  # nothing after the last MoE layer is measured
    return splits, refusal
