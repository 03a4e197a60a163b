"""Layer-skip models: their modeling code, registered with the Auto classes on `import sparsify`."""

from pathlib import Path

from sparsify.convert.skip import modeling_skip
from sparsify.convert.skip.modeling_skip import SkipConfig, SkipForCausalLM

MODELING_FILE = "modeling_skip.py"


def modeling_source() -> bytes:
    """The remote code every saved skip model carries: this version, matching the config it wrote."""
    return Path(modeling_skip.__file__).read_bytes()


def remote_code() -> dict[str, bytes]:
    """Files a skip folder carries so that it loads with `trust_remote_code=True` without sparsify."""
    return {MODELING_FILE: modeling_source()}


def register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(SkipConfig.model_type, SkipConfig, exist_ok=True)
    AutoModelForCausalLM.register(SkipConfig, SkipForCausalLM, exist_ok=True)


# `import sparsify` registers these classes once transformers has been imported; when this module
# is what imports transformers, that hook runs while this module is half-initialised and finds no
# `register` yet, so register here as well (idempotent: exist_ok).
register()

__all__ = ["MODELING_FILE", "SkipConfig", "SkipForCausalLM", "modeling_source", "register", "remote_code"]
