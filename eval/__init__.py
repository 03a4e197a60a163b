"""Evaluation (quality, cost, routing): not built yet; see the open `sparsify eval` issue."""
