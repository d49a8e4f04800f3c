"""multibyte: tokenizer-free byte-level generative models (MEGABYTE, MambaByte)."""
