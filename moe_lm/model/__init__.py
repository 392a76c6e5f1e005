"""The model: a decoder-only transformer with sparse MoE layers."""

from moe_lm.model.moe import MoE, MoEStats
from moe_lm.model.transformer import ModelOutput, Transformer, count_params, is_moe_layer

__all__ = ["MoE", "MoEStats", "ModelOutput", "Transformer", "count_params", "is_moe_layer"]
