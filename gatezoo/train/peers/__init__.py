"""Peer models built at the size of the presets, for side-by-side runs: timm vision models and
the translation peers (torch.nn.Transformer, x-transformers)."""
