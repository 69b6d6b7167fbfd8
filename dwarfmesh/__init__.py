"""dwarfmesh: whole models on whole machines, fused into one LLM ensemble over the LAN."""

from dwarfmesh import _fastblas

_fastblas.preload()

__version__ = "0.1.0"
