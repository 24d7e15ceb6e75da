"""Images from prompts: differentiable DDIM with guidance, `mcti generate`, the CLIP image metric.

May import: errors, paths, models, tokens, conditioning, runtime.
"""
