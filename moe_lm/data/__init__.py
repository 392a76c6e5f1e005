"""Data: tiktoken tokenizer, the built-in corpus and user-file readers, the prepare step that writes
uint32 token shards, and the resumable loader of packed `(B, S+1)` batches.

    tok = get_tokenizer(cfg.data.tokenizer)
    shard_dir = prepare(cfg.data, tok)
    train = TokenLoader(shard_dir, "train", cfg.data.seq_len, cfg.data.batch_size, seed)
"""

from moe_lm.data.loader import TokenLoader
from moe_lm.data.prepare import load_meta, prepare
from moe_lm.data.tokenizer import Tokenizer, get_tokenizer

__all__ = ["Tokenizer", "TokenLoader", "get_tokenizer", "load_meta", "prepare"]
