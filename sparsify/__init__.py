"""sparsify: dense Hugging Face causal LMs into sparse ones (MoE upcycling, fine-grained MoE, layer skip).

`import sparsify` makes the architectures its variants define (layer skip) loadable by transformers'
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
    """Make every variant's own architecture (layer skip) loadable by AutoConfig / AutoModelForCausalLM."""
    import importlib

    from sparsify.convert import VARIANTS

    for name in dict.fromkeys(v.architecture for v in VARIANTS.values() if v.architecture):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name not in ("torch", "transformers"):  # else: nothing to register with
                _warn_unregistered(error)
            continue
        except ImportError as error:
            if "partially initialized" not in str(error):
                _warn_unregistered(error)
            # Else a variant's own modeling file is what imported transformers (someone imported it
            # first): its architecture module registers itself whenever it is imported, as every
            # sparsify command that loads the variant does.
            continue
        except Exception as error:  # noqa: BLE001 - never break the user's `import transformers`
            _warn_unregistered(error)
            continue
        register = getattr(module, "register", None)
        if register is None:
            # The module is itself importing transformers (this ran from the hook below, midway):
            # it registers itself once its import completes.
            continue
        try:
            register()
        except Exception as error:  # noqa: BLE001
            _warn_unregistered(error)


def _warn_unregistered(error: Exception) -> None:
    import warnings

    warnings.warn(f"sparsify could not register its architectures with transformers: {error}", stacklevel=3)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is imported, wraps the real loader so that the
    registration runs once the module has fully executed, then steps aside. A mere look-up
    (`importlib.util.find_spec("transformers")`, as accelerate and lm_eval do) executes nothing,
    so the finder stays until a real import has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" or getattr(self, "_looking", False):
            return None
        self._looking = True  # find_spec below walks sys.meta_path again, this finder included
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._looking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module
        finder = self

        def exec_module(module):
            execute(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            register_architectures()

        spec.loader.exec_module = exec_module
        return spec


# One hook per interpreter, even if this module is reloaded (a reload makes a new class).
if "transformers" in sys.modules:
    register_architectures()
elif not any(type(finder).__name__ == "_RegisterAfterTransformers" for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())

__all__ = ["SparsifyError", "__version__", "register_architectures", "upcycle"]
