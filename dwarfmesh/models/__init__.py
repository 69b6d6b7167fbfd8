"""Model names, registry pulls and GGUF files.

Owns: resolving a model name or path to files and pulling it (`registry`), GGUF → mlx-lm
conversion (`gguf_import`) and a GGUF's tokenizer for it (`gguf_tokenizer`).
Does not: run a model (that is `engine`).
"""
