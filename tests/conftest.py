import os
import warnings

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import workbench as wb  # noqa: E402
from workbench.data import synthetic_shapes  # noqa: E402


@pytest.fixture(scope="session")
def backbone():
    return wb.load_backbone(device="cpu")


@pytest.fixture(scope="session")
def shapes():
    return synthetic_shapes(4, train_per_class=20, val_per_class=6, test_per_class=10)


@pytest.fixture(scope="session")
def whu():
    return wb.load_dataset("whu_rs19_mini")


@pytest.fixture
def cache(backbone, tmp_path):
    return wb.FeatureCache(backbone, tmp_path / "features", show_progress=False)


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
