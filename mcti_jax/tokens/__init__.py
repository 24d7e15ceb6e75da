"""Class tokens: placeholder words and templates, splicing learned vectors into prompts, the subspace of
attribute words, exports in every format and the `mcti export` command.

May import: errors, paths, models.
"""
