"""`--to skip`: per-token gates before every attention and FFN sublayer (EfficientSkip-style).

The output keeps every dense tensor under its own name and adds one gate (a vector and a bias) per
gated sublayer; the architecture is `SkipForCausalLM`, whose self-contained modeling file is
written next to the weights (auto_map) so the folder loads with `trust_remote_code=True` without
sparsify, and through the registered Auto classes with it. Every gate starts open
(p = sigmoid(bias) > threshold), so the fresh model computes exactly the dense model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sparsify.checkpoint_writer import PlannedTensor
from sparsify.convert.base import DROPPED_CONFIG_KEYS, ConversionPlan, Exactness, kept_source_tensors, passthrough
from sparsify.convert.skip.describe import SkipLayout
from sparsify.convert.skip.modeling import remote_code
from sparsify.convert.skip.options import GATE_CHOICES, SkipOptions
from sparsify.errors import SparsifyError

# Families whose decoder layer the skip modeling code wraps (same sublayer structure).
SKIP_BASES = ("llama", "mistral", "qwen2", "qwen3")


def plan(source: Any, options: SkipOptions, dtype: torch.dtype, on_progress: Any = None) -> ConversionPlan:
    config = source.config
    if config.model_type not in SKIP_BASES:
        raise SparsifyError(
            f"--to skip supports model types {', '.join(SKIP_BASES)}; this model is '{config.model_type}'"
        )
    if options.gates not in GATE_CHOICES:
        raise SparsifyError(f"--gates must be one of {', '.join(GATE_CHOICES)}, got '{options.gates}'")
    layers = int(config.num_hidden_layers)
    gated_layers = list(range(options.exclude_first, layers - options.exclude_last))
    if options.exclude_first < 0 or options.exclude_last < 0 or not gated_layers:
        raise SparsifyError(f"--exclude-first/--exclude-last leave no layer to gate (the model has {layers})")
    if not 0.0 < options.threshold < 1.0:
        raise SparsifyError(f"--threshold must be between 0 and 1, got {options.threshold}")
    open_probability = 1 / (1 + math.exp(-options.gate_bias_init))
    if open_probability <= options.threshold:
        raise SparsifyError(f"--gate-bias-init {options.gate_bias_init} starts the gates closed (sigmoid {open_probability:.3f} <= threshold)")

    sublayers = GATE_CHOICES[options.gates]
    base = {k: v for k, v in config.to_dict().items() if k not in DROPPED_CONFIG_KEYS}
    out_config = {
        **base,
        "base_model_type": config.model_type,
        "gate_attention": "attention" in sublayers,
        "gate_ffn": "ffn" in sublayers,
        "gated_layers": gated_layers,
        "skip_threshold": options.threshold,
        "gate_bias_init": options.gate_bias_init,
        "model_type": "sparsify_skip",
        "architectures": ["SkipForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_skip.SkipConfig", "AutoModelForCausalLM": "modeling_skip.SkipForCausalLM"},
        "dtype": str(dtype).removeprefix("torch."),
    }
    tensors = [passthrough(source.tensors, name, dtype) for name in kept_source_tensors(source)]
    hidden = int(config.hidden_size)
    for sublayer in sublayers:  # gates in fp32: the decision near the threshold needs the precision
        for layer in gated_layers:
            tensors.append(PlannedTensor(f"gates.{sublayer}.{layer}.weight", (hidden,), torch.float32, lambda: torch.zeros(hidden)))
            tensors.append(PlannedTensor(f"gates.{sublayer}.{layer}.bias", (), torch.float32,
                                         lambda: torch.tensor(float(options.gate_bias_init))))
    layout = SkipLayout(
        family=config.model_type,
        architecture="SkipForCausalLM",
        gates=list(sublayers),
        gated_layers=gated_layers,
        threshold=options.threshold,
        kv_rule="a skipped attention sublayer still writes the token's keys and values",
        # With every gate forced open the student computes the dense model: gate training takes
        # its teacher from the student's own weights this way.
        dense_path={"gates": "open"},
    )
    exact = Exactness(True, f"every gate starts open (sigmoid({options.gate_bias_init}) = {open_probability:.4f} > {options.threshold})")
    return ConversionPlan(out_config, tensors, layout, exact, tags=["layer-skip"], files=remote_code())
