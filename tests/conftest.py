import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people, not test logs

import pytest

from unlearn.data import synthesize
from unlearn.target import build_target


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A tiny synthetic benchmark: 6 documents per task."""
    return synthesize(tmp_path_factory.mktemp("data") / "synth", seed=1, docs_per_task=6,
                      pretrain_factor=2, facts=8)


@pytest.fixture(scope="session")
def tiny_target(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "target"
    record = build_target(synth_dir, out, preset="tiny", seed=0)
    return out, record
