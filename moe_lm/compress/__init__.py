"""Making a trained model smaller: int8 weight-only experts (`quantize`), expert pruning (`prune`)."""
