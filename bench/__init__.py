"""Measurements of dwarfmesh: `ensemble_vs_single.py` is the entry point (run it with --help).

| module | owns |
|---|---|
| `texts.py` | which bytes of which files are scored (documents: a prompt, then a scored slice) |
| `quality.py` | teacher-forced bits per byte of each member and of the ensemble as fused |
| `speed.py` | timing generation through real `dwarfmesh node` processes on 127.0.0.1 |
| `llamacpp.py` | the same model's GGUF through llama.cpp, as the single-node peer |
| `engines.py` | the two engines on one GGUF, and llama.cpp alone (`--repeat`, `--pairs`) |
| `omp_policy.py` | libgomp's wait policy for a llama.cpp node |
| `speculate.py` | speculative rounds against plain ones, on one mesh in one run |
| `report.py` | goals, the rich tables and the PNG plot of one result |

Importing `bench` imports `dwarfmesh` first, whose OpenBLAS preload must precede mlx.
"""

import dwarfmesh  # noqa: F401
