"""Layer-skip models: their modeling code, registered with the Auto classes on `import sparsify`."""

from sparsify.skip.modeling_skip import SkipConfig, SkipForCausalLM


def register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(SkipConfig.model_type, SkipConfig, exist_ok=True)
    AutoModelForCausalLM.register(SkipConfig, SkipForCausalLM, exist_ok=True)


__all__ = ["SkipConfig", "SkipForCausalLM", "register"]
