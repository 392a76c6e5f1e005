"""Interoperability with Hugging Face: import (hf_configs, hf_weights, safetensors_dir,
import_hf) and export (hf_build, export_hf) of Mixtral, Qwen3-MoE and OLMoE."""
