"""The one exception type sparsify raises for problems a user can fix.

The CLI prints its message as a single red line and exits non-zero; library users catch it.
Every message should say what to do, not only what went wrong.
"""


class SparsifyError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
