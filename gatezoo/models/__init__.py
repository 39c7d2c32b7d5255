"""Models composed from :mod:`gatezoo.blocks` (ViT family, MLP-Mixer, NiNformer, translation
Transformer). Nothing here yet: the models arrive with the vision and translation work."""
