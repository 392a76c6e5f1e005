"""Data: tiktoken tokenizer, the built-in corpus and user-file readers, the prepare step that writes
uint32 token shards (chunk by chunk: in-process here, on datatrove in `moe_lm.data.engine`), the
resumable loader of packed `(B, S+1)` batches and weighted mixtures of several sources.

    tok = get_tokenizer(cfg.data.tokenizer)
    shard_dir = prepare(cfg.data, tok)
    train = TokenLoader(shard_dir, "train", cfg.data.seq_len, cfg.data.batch_size, seed)
    data = open_run_data(cfg.data, tok, seed, rank, world_size)  # data.path or data.sources
"""

from moe_lm.data.loader import TokenLoader
from moe_lm.data.mixture import MixtureLoader, RunData, open_run_data, prepare_sources
from moe_lm.data.prepare import load_meta, prepare
from moe_lm.data.tokenizer import Tokenizer, get_tokenizer

__all__ = ["MixtureLoader", "RunData", "Tokenizer", "TokenLoader", "get_tokenizer", "load_meta",
           "open_run_data", "prepare", "prepare_sources"]
