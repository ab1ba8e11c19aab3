"""The data path: shard streaming, safe decoding, tokenization, masking, batching, collation."""
