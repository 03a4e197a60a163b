"""`sparsify distill`: a sparse model folded back into a dense one of its parent's size and family, then
trained against the sparse model (KL at a temperature mixed with the next-token loss).

Not an `upcycle --to` variant but its reverse: options.py (the flags), usage.py (how often and how
strongly each expert is routed to on calibration text), fold.py (the initialisations as arithmetic on
one layer's experts), student.py (the dense model in the family's native architecture), run.py (the
pipeline: check, measure, fold, train, record).
"""
