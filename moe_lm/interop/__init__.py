"""Moving models between moe_lm and other libraries: `hf_export` writes a transformers Mixtral."""
