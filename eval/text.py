"""The evaluation text: documents tokenized into one stream, with what each token is worth.

Documents are joined with the end-of-sequence token and every document starts right after one,
so each text token — the first included — is predicted from real context. Separators are
context, never targets: perplexity counts text tokens only, and bits per byte divides the same
log-loss by the UTF-8 bytes of the same text, which makes it comparable across tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sparsify.errors import SparsifyError


@dataclass
class EvalText:
    ids: torch.Tensor  # (n,) int64
    is_target: torch.Tensor  # (n,) bool: counted when predicted (text tokens, not separators)
    num_bytes: int  # UTF-8 bytes of the counted text
    num_documents: int

    @property
    def num_targets(self) -> int:
        return int(self.is_target.sum())


def build_eval_text(documents: Iterable[str], tokenizer, max_tokens: int) -> EvalText:
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if separator is None:
        raise SparsifyError("the tokenizer has neither an end-of-sequence nor a beginning-of-sequence token")
    ids, targets, num_bytes, documents_used = [separator], [False], 0, 0
    for text in documents:
        room = max_tokens - len(ids) - 1
        if room <= 0:
            break
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            continue
        if len(tokens) > room:  # the last document is cut; count the bytes of what is kept
            tokens = tokens[:room]
            text = tokenizer.decode(tokens)
        ids += [*tokens, separator]
        targets += [True] * len(tokens) + [False]
        num_bytes += len(text.encode("utf-8"))
        documents_used += 1
    if documents_used == 0:
        raise SparsifyError("the evaluation data has no text")
    return EvalText(torch.tensor(ids), torch.tensor(targets), num_bytes, documents_used)


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position): sliding windows of `window` tokens moved by `stride`;
    each position is scored once, in the first window that reaches it, with the most context.
    Windows must overlap (stride < window): a window's first token has no context inside it, so
    with disjoint windows it would go unscored and bits per byte would no longer cover the text."""
    if not 0 < stride < window:
        raise SparsifyError(f"--stride must be at least 1 and below --window ({window}), not {stride}")
    spans, scored_until, begin = [], 1, 0  # position 0 has no context: never scored
    while True:
        end = min(begin + window, length)
        spans.append((begin, end, scored_until))
        scored_until = end
        if end == length:
            return spans
        begin += stride
