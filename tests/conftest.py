import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("hostile_mesh")  # its asserts report like a test file's

# The tests run several nodes on one machine: threads that spin between operations
# (right for one node per machine) would take the cores from the other nodes and tests.
# libgomp's (llama.cpp) sleep at once; OpenBLAS's (mlx on the CPU) spin 2^8 cycles, not
# 2^28 (that spinning was a sixth of the CPU time of the real-model mlx tests). Set before
# OpenBLAS is loaded (`import dwarfmesh`); every node process started here inherits them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import dwarfmesh  # noqa: E402,F401  (OpenBLAS preload before anything imports mlx)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Three tiny llama models sharing one tokenizer, different random weights."""
    from tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return [make_tiny_model(root / f"m{seed}", seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="session")
def tiny_ggufs_shared(tmp_path_factory):
    """Three tiny GGUF files (llama layout) sharing one tokenizer, different random
    weights: a node runs them on the machine's default engine (`--engine auto`: llama.cpp
    on a CPU-only machine, mlx on the file's import elsewhere)."""
    from tiny import make_tiny_gguf

    root = tmp_path_factory.mktemp("tiny-gguf")
    out = []
    for seed in (1, 2, 3):
        make_tiny_gguf(root / f"m{seed}.gguf", "llama", seed=seed)   # model names m1..m3
        out.append(root / f"m{seed}.gguf")
    return out


@pytest.fixture(scope="module")
def own_model_cache(tmp_path_factory):
    """For a module whose nodes need no registry model: the tiny GGUFs' tokenizer
    directories go to a model cache of its own, not into the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DWARFMESH_CACHE", str(tmp_path_factory.mktemp("model-cache")))
        yield


@pytest.fixture(scope="session")
def mixed_models(tmp_path_factory):
    """Three tiny llama models whose byte-level BPE tokenizers differ (vocab 320, 400, 288:
    different merges, so one text encodes to different ids)."""
    from tiny import make_tiny_model

    root = tmp_path_factory.mktemp("mixed")
    return [make_tiny_model(root / f"v{v}", seed, vocab_size=v)
            for seed, v in ((11, 320), (12, 400), (13, 288))]


@pytest.fixture(scope="session")
def mixed_ggufs(tmp_path_factory):
    """Three tiny GGUF files (llama layout) whose byte-level BPE tokenizers differ (vocab
    320, 400, 288; model names v320, v400, v288), float32 weights and peaked outputs: a
    node runs them on the machine's default engine, and `reference.direct_for` computes
    the same numbers from scratch on that engine."""
    from tiny import make_tiny_gguf

    root = tmp_path_factory.mktemp("mixed-gguf")
    out = []
    for seed, v in ((11, 320), (12, 400), (13, 288)):
        make_tiny_gguf(root / f"v{v}.gguf", "llama", seed=seed, vocab_size=v, context=2048,
                       quantize=False, output_scale=8.0)
        out.append(root / f"v{v}.gguf")
    return out


# The files that take longest on 2 cores start first (stable: tests keep their order in a
# file), so that when scripts/test runs two files at a time both workers finish near the
# same moment, instead of one idling while the other runs a long file that came last.
LONGEST_FIRST = ["test_llamacpp_real.py", "test_faults.py", "test_models.py",
                 "test_netns_mesh.py", "test_humaneval.py", "test_hostile_fuzz.py",
                 "test_hostile_authority.py", "test_bench.py", "test_rank.py", "test_mesh.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
