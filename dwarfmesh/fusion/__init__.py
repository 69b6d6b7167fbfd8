"""Pure numpy: combining the members' distributions, and the text units they are cut into.

Owns: pools, floor, sampling and online weights over token ids (`pools`), alignment and
scoring across tokenizers (`text`), and where text is cut or stops (`textcut`).
Does not: any I/O, any messaging, any model.
"""
