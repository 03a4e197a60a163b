"""sparsify: dense Hugging Face causal LMs into sparse ones (MoE upcycling, fine-grained MoE) and back."""

from sparsify.errors import SparsifyError

__version__ = "0.1.0"


def upcycle(*args, **kwargs):
    """See `sparsify.upcycle.upcycle` (imported lazily: it pulls in torch and transformers)."""
    from sparsify.upcycle import upcycle as run

    return run(*args, **kwargs)


__all__ = ["SparsifyError", "__version__", "upcycle"]
