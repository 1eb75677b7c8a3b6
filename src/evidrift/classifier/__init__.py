"""Image classifiers: the timm-based registry, heads, weights, freezing, checkpoints, training
stages and evaluation."""
