"""moe_lm: a readable training system for sparse Mixture-of-Experts language models."""

__version__ = "0.1.0"
