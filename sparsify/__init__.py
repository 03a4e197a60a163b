"""sparsify: dense Hugging Face causal LMs into sparse ones (MoE upcycling, fine-grained MoE) and back."""

from sparsify.errors import SparsifyError

__version__ = "0.1.0"


def upcycle(*args, **kwargs):
    """See `sparsify.upcycle.upcycle` (imported lazily: it pulls in torch and transformers)."""
    from sparsify.upcycle import upcycle as run

    return run(*args, **kwargs)


def _register_architectures() -> None:
    """Make the architectures sparsify defines (layer skip) loadable by the Auto classes."""
    try:
        from sparsify.skip import register
    except ImportError:  # transformers missing: nothing to register with
        return
    register()


_register_architectures()

__all__ = ["SparsifyError", "__version__", "upcycle"]
