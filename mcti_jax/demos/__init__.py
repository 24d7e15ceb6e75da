"""The experiments on the embedded tiny model that `mcti demo` runs, chosen by config.kind.

May import: everything below cli.
"""
