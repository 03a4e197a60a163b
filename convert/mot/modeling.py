"""Mixture-of-Tokens models: their modeling code, registered with the Auto classes on `import sparsify`."""

from pathlib import Path

from sparsify.convert.mot import modeling_mot
from sparsify.convert.mot.modeling_mot import MoTConfig, MoTForCausalLM

MODELING_FILE = "modeling_mot.py"


def modeling_source() -> bytes:
    """The remote code every saved MoT model carries: this version, matching the config it wrote."""
    return Path(modeling_mot.__file__).read_bytes()


def remote_code() -> dict[str, bytes]:
    """Files a MoT folder carries so that it loads with `trust_remote_code=True` without sparsify."""
    return {MODELING_FILE: modeling_source()}


def register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MoTConfig.model_type, MoTConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoTConfig, MoTForCausalLM, exist_ok=True)


# As for skip: when this module is what imports transformers, `import sparsify`'s hook finds it
# half-initialised, so register here as well (idempotent).
register()

__all__ = ["MODELING_FILE", "MoTConfig", "MoTForCausalLM", "modeling_source", "register", "remote_code"]
