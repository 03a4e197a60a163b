"""`sparsify eval`: quality, cost and routing of a model against its teacher, as one report.

Modules: text (held-out token stream), quality (perplexity, bits per byte, KL and top-1 against
the teacher), cost (parameters, FLOPs, measured speed and memory), probes + routing (per-variant
hooks: expert load, entropy, skip rates), tasks (lm-evaluation-harness), report (JSON, Markdown,
compare), plots (PNG heatmaps), run (the pipeline behind the CLI).
"""
