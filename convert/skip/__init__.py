"""The layer-skip variant, `--to skip`: a per-token gate before every attention and FFN sublayer,
in its own architecture (`SkipForCausalLM`) with self-contained remote code.

options.py        conversion and gate-training options (torch-free)
plan.py           the converted checkpoint: dense tensors kept, one gate per sublayer added
modeling_skip.py  the architecture; copied into every skip folder (auto_map), needs only torch and transformers
modeling.py       its registration with transformers' Auto classes, and the files a folder carries
describe.py       the `layout` record and how reports show skip rates (torch-free)
decisions.py      gates in training: held open for the teacher, the sparsity loss
probe.py          skip rates in `sparsify eval`, and the FLOPs they leave
freezing.py       fixing gates that barely decide; frozen_copy.py: `sparsify skip-freeze`
sweep.py          `sparsify skip-sweep`: quality, skip rate and speed per threshold
variant.py        the hooks the stages call
"""

from sparsify.convert.skip.options import SkipOptions, SkipTrainOptions
from sparsify.convert.variant import Metric, Variant

_SKIP_RATE = Metric("skip_rate", "skip rate", "skip", ".1%", detail="sublayers x tokens", share_of="sublayer computations")

VARIANTS = (
    Variant(
        "skip",
        "Layer skip: a per-token gate before every attention and FFN sublayer (remote-code architecture).",
        SkipOptions,
        implementation="sparsify.convert.skip.variant",
        description="sparsify.convert.skip.describe",
        train_options=SkipTrainOptions,
        step_metrics=(_SKIP_RATE,),
        heldout_metrics=(_SKIP_RATE,),
        decides="skip gates",
        architecture="sparsify.convert.skip.modeling",
    ),
)
