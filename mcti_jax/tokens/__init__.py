"""Class tokens: placeholder words and templates, splicing learned vectors into prompts, the subspace of
attribute words, exports in every format, re-exporting (reexport.py) and its command, `mcti export`.

May import: errors, paths, models.
"""
