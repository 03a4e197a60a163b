"""sparsify: dense Hugging Face causal LMs into sparse ones (MoE upcycling, fine-grained MoE, layer skip).

`import sparsify` makes the architectures sparsify defines (layer skip) loadable by transformers'
Auto classes, without importing transformers itself: importing it (and torch) takes seconds, which
`sparsify --help` must not pay. If transformers is already imported, they are registered now;
otherwise right after transformers finishes importing, through a one-shot import hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from sparsify.errors import SparsifyError

__version__ = "0.2.0.dev0"


def upcycle(*args, **kwargs):
    """See `sparsify.upcycle.upcycle` (imported lazily: it pulls in torch and transformers)."""
    from sparsify.upcycle import upcycle as run

    return run(*args, **kwargs)


def register_architectures() -> None:
    """Make the layer-skip architecture loadable by AutoConfig / AutoModelForCausalLM."""
    try:
        from sparsify.skip import register
    except ImportError:  # transformers or torch missing: nothing to register with
        return
    try:
        register()
    except Exception as error:  # noqa: BLE001 - never break the user's `import transformers`
        import warnings

        warnings.warn(f"sparsify could not register its layer-skip architecture with transformers: {error}", stacklevel=2)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is about to be imported, wraps the real loader so
    that the registration runs once the module has fully executed, then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            register_architectures()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    register_architectures()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())

__all__ = ["SparsifyError", "__version__", "register_architectures", "upcycle"]
