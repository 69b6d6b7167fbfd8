import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import dwarfmesh  # noqa: E402,F401  (OpenBLAS preload before anything imports mlx)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Three tiny llama models sharing one tokenizer, different random weights."""
    from tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return [make_tiny_model(root / f"m{seed}", seed) for seed in (1, 2, 3)]
