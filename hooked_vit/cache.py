"""`ViTActivationCache`: TransformerLens' `ActivationCache`, plus what a classifier needs."""
from transformer_lens import ActivationCache


class ViTActivationCache(ActivationCache):
    pass
