"""Learning the class tokens: the run's setup, the compiled step, the phases, checks, the run's
signature, where tokens start, classes per pass.

May import: errors, paths, plots, models, data, tokens, methods, runtime, generation, classify,
guides.
"""
