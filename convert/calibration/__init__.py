"""Calibration: run the dense model on a little text, one decoder layer at a time, and measure
which FFN neurons each token uses. Data-driven conversions (`fine-moe --split coactivation`,
`--to prune`) decide from these measurements which neurons go together, which are always on,
and which can go.

options.py  the --calibration-* flags (torch-free)
runner.py   the dense model layer by layer: each layer's FFN inputs, with only one layer in memory
neurons.py  per-token neuron importance |silu(g.x) * (u.x)| * |down_n|, and its statistics
"""
