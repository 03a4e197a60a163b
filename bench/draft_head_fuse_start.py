"""Does the draft head's balanced fuse start matter? Trains two heads alike on SmolLM2-135M (CPU is
enough), one starting `fuse` as [I | s I] (the token's embedding raised to the top state's scale, the
default), one as [I | I] (the embedding ~300x smaller than the state), and prints both records.

Fit and score windows are train text (packed, the score windows the last read); scores as
`sparsify draft-head` reports them (convert/skip/draft_head_training.py).

    python bench/draft_head_fuse_start.py --model skip-folder --data train.jsonl.gz --steps 150 --depth 1 --out start.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder (e.g. `sparsify upcycle smollm2-135m --to skip`)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--window-len", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from sparsify.convert.calibration.runner import text_blocks
    from sparsify.convert.skip.draft_head import DraftHead
    from sparsify.convert.skip.draft_head_training import DraftHeadOptions, fit_draft_head
    from sparsify.sources import load_model, load_tokenizer

    model = load_model(args.model, dtype=torch.float32).eval()
    model.requires_grad_(False)
    options = DraftHeadOptions(steps=args.steps, batch_size=args.batch_size, window_len=args.window_len, depth=args.depth)
    blocks = text_blocks([args.data], load_tokenizer(args.model), (args.steps * args.batch_size + options.score_windows) * args.window_len,
                         args.window_len)
    rows = []
    for start in ("balanced", "plain"):
        head = DraftHead(model)
        if start == "plain":
            head.balance_inputs = lambda feature_rms, embedding_rms: None  # keep [I | I]
        started = time.time()
        fit = fit_draft_head(head, model, blocks[: -options.score_windows], blocks[-options.score_windows:], options)
        rows.append({"fuse_start": start, "s": round(time.time() - started), **fit.record()})
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"benchmark": "draft_head_fuse_start", "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
