"""Data-driven MoT starts (`--calibration-data`): which neurons form each expert, and the controller.

Why the controller is fitted per expert, across tokens. A MoT mixture normalises over the G tokens of
a group for each expert, so what matters is how one expert's logits rank *tokens* (the opposite of a
token-choice router, which ranks a token's experts). At a low mixture temperature an expert computes
on the token with the largest logit alone and gives its output to that token alone; the other tokens
lose that expert's contribution. The token that loses least by not getting it is the one the expert
matters least to, relative to the token's whole FFN output: the logit for expert e is the expert's share
of the token's output, |down_e h_e(x)| / sum_f |down_f h_f(x)|. (The plain size |down_e h_e(x)| lets
tokens with large outputs take every expert of their group and leaves the others with almost none; on
SmolLM2-135M calibration tokens, pairs assigned by the fitted share lose 4-13% less of the FFN's output
than pairs assigned by the fitted size, in every layer measured.) Each controller column is a ridge
regression of that share, standardised over the calibration tokens, on the FFN input x (an intercept
would cancel in the softmax over tokens); the column is scaled so its logits
have standard deviation 1 on the calibration text, which makes --mix-temperature the only knob of
sharpness: tau = 1 still blends, tau <= 0.1 nearly picks one token per expert.

Splits: contiguous slices of the FFN, or coactivation (neurons that matter for the same tokens go
together: balanced k-means of their importance profiles, as `--to fine-moe --split coactivation`), so
that the token an expert picks needs most of the expert's neurons.

Every layer is measured on the dense model's activations (a mixture's output depends on the batch, so
there is no single converted activation to propagate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.convert.base import Progress, no_progress
from sparsify.convert.calibration.neurons import NeuronStatistics
from sparsify.convert.moe.clustering import coactivation_groups, group_output_norms, ridge_fit

CONTROLLER_LOGIT_STD = 1.0


@dataclass
class CalibratedMoTLayer:
    groups: torch.Tensor  # (experts of one copy, neurons per expert): the FFN neurons of each expert
    controller: torch.Tensor  # (hidden, experts of one copy), fp32
    figures: dict[str, float]


def fit_controller(x: torch.Tensor, scores: torch.Tensor, logit_std: float = CONTROLLER_LOGIT_STD) -> torch.Tensor:
    """Columns C (hidden, experts) whose logits x C rank tokens, per expert, like `scores` (tokens, experts) does."""
    columns = ridge_fit(x, (scores - scores.mean(dim=0)) / scores.std(dim=0).clamp_min(1e-12))
    return columns * (logit_std / (x @ columns).std(dim=0).clamp_min(1e-12))


def _figures(x: torch.Tensor, shares: torch.Tensor, controller: torch.Tensor) -> dict[str, float]:
    """How well the controller picks, for pairs of calibration tokens: how often it gives each expert to the
    token it matters more to, and the rank correlation of its logits with the expert's shares."""
    logits = x @ controller
    half = x.shape[0] // 2
    first, second = slice(0, half), slice(half, 2 * half)
    agree = ((logits[first] > logits[second]) == (shares[first] > shares[second])).float().mean()
    a, b = (t.argsort(dim=0).argsort(dim=0).float() for t in (logits, shares))  # ranks per expert
    a, b = a - a.mean(0), b - b.mean(0)
    spearman = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)
    return {"pair_agreement": float(agree), "spearman": float(spearman.mean())}


def calibrate_mot_layer(x: torch.Tensor, ffn: dict[str, torch.Tensor], experts: int, split: str, seed: int) -> CalibratedMoTLayer:
    neurons = torch.arange(ffn["gate"].shape[0], device=x.device)
    if split == "coactivation":
        groups = coactivation_groups(NeuronStatistics.measure(x, ffn), neurons, experts, seed)
    else:
        groups = neurons.view(experts, -1)
    norms = group_output_norms(x, ffn, groups)
    shares = norms / norms.sum(dim=1, keepdim=True).clamp_min(1e-30)
    controller = fit_controller(x, shares)
    return CalibratedMoTLayer(groups.cpu(), controller.cpu(), _figures(x, shares, controller))


def calibrate_mot(source, options, layers: list[int], experts: int, on_progress: Progress = no_progress) -> dict[int, CalibratedMoTLayer]:
    """Every MoT layer's experts and controller from `options`' calibration text (a CalibrationTextOptions);
    `experts` counts one copy's experts."""
    from sparsify.convert.calibration.runner import calibration_blocks, layer_activity

    blocks = calibration_blocks(source, options)
    wanted, last = set(layers), max(layers)
    calibrated: dict[int, CalibratedMoTLayer] = {}
    on_progress("calibrating", 0, last + 1)
    for activity in layer_activity(source, blocks, on_layer=lambda done, total: on_progress("calibrating", done, last + 1)):
        if activity.layer in wanted:
            calibrated[activity.layer] = calibrate_mot_layer(activity.ffn_input, activity.ffn, experts, options.chosen_split,
                                                             seed=1009 + activity.layer)
        if activity.layer == last:
            break
    return calibrated
