"""The N-shot x evaluator x seed harness (`mcti eval`), its evaluators by name, its metrics.

May import: everything below demos and cli.
"""
