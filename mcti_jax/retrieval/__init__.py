"""Composite retrieval: queries holding a class token, relevance, MRR and R@k, labels files, the tiny
world's gallery, Generation-Aided Image Retrieval (GAIR) and `mcti retrieve`.

May import: everything below evaluation (models, data, tokens, generation, classify, tiny).
"""
