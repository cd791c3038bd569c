"""annotate: automatic image annotation (multi-label classification) in JAX/Flax NNX."""
