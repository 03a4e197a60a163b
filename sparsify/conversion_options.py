"""The options of a conversion that every variant takes (how the source is read and the output
written), as one dataclass: `sparsify upcycle` builds its flags from it and a recipe's `upcycle:`
section reads it, next to the chosen variant's own options. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparsify.option_values import check_rules, dtype_name


@dataclass
class ConversionOptions:
    dtype: str = field(default="auto", metadata={"help": "Output dtype: auto (the source's), float32, bfloat16 or float16 (bf16, fp16, fp32 also read)."})
    revision: str = field(default="", metadata={"help": "Hub revision (branch, tag or commit) of a Hub source; empty: main."})
    allow_pickle: bool = field(default=False, metadata={"help": "Accept pickle .bin weights (read with weights_only=True)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the source's custom config code to run."})
    max_shard_size: float = field(default=5.0, metadata={"help": "Largest output shard, in GB."})

    def validate(self) -> None:
        dtype_name(self.dtype)
        check_rules(self, (("max_shard_size", lambda v: v > 0, "must be greater than 0 (GB)"),))

    def upcycle_arguments(self) -> dict[str, Any]:
        """The keyword arguments of `sparsify.upcycle.upcycle` these options stand for."""
        return {"dtype": self.dtype, "revision": self.revision or None, "allow_pickle": self.allow_pickle,
                "trust_remote_code": self.trust_remote_code, "max_shard_bytes": int(self.max_shard_size * 1e9)}
