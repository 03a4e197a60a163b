"""Mixture of Tokens, `--to mot`: the FFNs of the chosen layers become continuous MoE layers that mix
the tokens of G sequences at one position (Antoniak et al., NeurIPS 2024), in their own architecture
(`MoTForCausalLM`) with self-contained remote code. At group size 1 the model is its dense source.

options.py        conversion and training options (torch-free)
plan.py           the converted checkpoint: FFN slices as experts, a controller per layer
modeling_mot.py   the architecture; copied into every MoT folder (auto_map), needs only torch and transformers
modeling.py       its registration with transformers' Auto classes, and the files a folder carries
describe.py       the `layout` record (torch-free)
decisions.py      controllers in training: the dense path at G = 1, the group-size schedule
variant.py        the hooks the stages call
"""

from sparsify.convert.mot.options import MoTOptions, MoTTrainOptions
from sparsify.convert.variant import Metric, Variant

_GROUP_SIZE = Metric("group_size", "group size", "G", ".0f")

VARIANTS = (
    Variant(
        "mot",
        "Mixture of Tokens: FFN slices as experts, each mixing G sequences' tokens at one position (remote-code architecture).",
        MoTOptions,
        implementation="sparsify.convert.mot.variant",
        description="sparsify.convert.mot.describe",
        train_options=MoTTrainOptions,
        step_metrics=(_GROUP_SIZE,),
        decides="controllers",
        architecture="sparsify.convert.mot.modeling",
    ),
)
