"""Moving models between moe_lm and Hugging Face transformers, both ways, for Mixtral, Qwen3-MoE
and OLMoE: import (hf_configs, hf_weights, safetensors_dir, import_hf) and export (hf_build,
hf_export)."""
