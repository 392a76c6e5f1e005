"""Inference: loading a trained model from a run or checkpoint directory, and the KV cache."""

from moe_lm.inference.kv_cache import KVCache, LayerKVCache
from moe_lm.inference.loading import LoadedModel, load_model
from moe_lm.training.trained_model import load_model_weights, resolve_checkpoint

__all__ = ["KVCache", "LayerKVCache", "LoadedModel", "load_model", "load_model_weights",
           "resolve_checkpoint"]
