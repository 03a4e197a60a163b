"""Recipes: whole pipelines (convert -> train -> evaluate -> push) from one YAML file.

`recipe.load_recipe` reads and checks a file (source.py keeps every value's file and line,
schema.py reads sections through the option dataclasses, overrides.py applies `a.b=v` / `~a`),
`stages.STAGES` is the registry of stages, and `runner.run_recipe` plans them against the run
folder's state (run_state.py) and runs what is not done.
"""
