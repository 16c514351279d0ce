import pytest
import torch

D = 32


@pytest.fixture(autouse=True)
def _one_thread():
    """Adapter tests run single-threaded; the previous setting is restored for other folders' tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_store(tmp_path_factory):
    """~200 pairs over 20 scenes, D=32: target = fixed random affine map of drafter + noise."""
    from egpt_core.adapters.synthetic import write_synthetic_pair_store

    url = str(tmp_path_factory.mktemp("adapters") / "store")
    info = write_synthetic_pair_store(url, hidden_size=D, n_scenes=20, pairs_per_scene=10, n_failed=3, shard_size=40)
    return info


@pytest.fixture(scope="session")
def small_stores(tmp_path_factory):
    """Two small train stores and a val store of other scenes (same affine map)."""
    from egpt_core.adapters.synthetic import write_synthetic_pair_store

    root = tmp_path_factory.mktemp("adapters_multi")
    a = write_synthetic_pair_store(str(root / "a"), hidden_size=D, n_scenes=4, pairs_per_scene=5, seed=1,
                                   scene_prefix="a")
    b = write_synthetic_pair_store(str(root / "b"), hidden_size=D, n_scenes=3, pairs_per_scene=5, seed=2,
                                   scene_prefix="b")
    v = write_synthetic_pair_store(str(root / "v"), hidden_size=D, n_scenes=2, pairs_per_scene=5, seed=3,
                                   scene_prefix="v")
    return a, b, v
