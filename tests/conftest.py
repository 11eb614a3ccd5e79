import json
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people, not test logs

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from unlearn import accel
from unlearn.data import synthesize
from unlearn.measure import memory
from unlearn.target import build_target

# what bench/margins.py varies to measure the outcome tests' spread (tests/MARGINS.md): the seed
# of the shared data and target, and the precision "auto" resolves to
SUITE_SEED = int(os.environ.get("UNLEARN_TEST_SEED", "0"))
SUITE_PRECISION = os.environ.get("UNLEARN_TEST_PRECISION", "fp32")
MARGINS_LOG = os.environ.get("UNLEARN_MARGINS_LOG")


@pytest.fixture(scope="session", autouse=True)
def one_precision_on_every_cpu():
    """``precision="auto"`` trains in fp32 here whatever the CPU: with AVX512-BF16 or AMX it
    would be bf16, and every threshold in this suite would move with the machine CI lands on.
    A test of bf16 asks for ``precision="bf16"``; ``UNLEARN_TEST_PRECISION=bf16`` makes "auto"
    bf16 everywhere (as on such a CPU)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accel, "cpu_has_bf16", lambda: SUITE_PRECISION == "bf16")
        yield


class Margin:
    """A training outcome checked against its bound and, under ``bench/margins.py``, recorded
    (``UNLEARN_MARGINS_LOG``): ``margin.above("forget NLL rise", rise, 0.2)``. The spread
    each one measured over seeds and precisions is in ``tests/MARGINS.md``."""

    def __init__(self, test: str):
        self.test = test

    def _record(self, name: str, value: float, side: str, bound: float) -> None:
        if MARGINS_LOG:
            with open(MARGINS_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps({"test": self.test, "name": name, "value": float(value),
                                    "side": side, "bound": bound, "seed": SUITE_SEED,
                                    "precision": SUITE_PRECISION}) + "\n")

    def above(self, name: str, value: float, bound: float) -> None:
        self._record(name, value, ">", bound)
        assert value > bound, f"{name}: {value:.4g}, not above {bound} (tests/MARGINS.md)"

    def below(self, name: str, value: float, bound: float) -> None:
        self._record(name, value, "<", bound)
        assert value < bound, f"{name}: {value:.4g}, not below {bound} (tests/MARGINS.md)"


@pytest.fixture
def margin(request) -> Margin:
    return Margin(request.node.nodeid)


def pytest_collection_modifyitems(items):
    """A test that checks an outcome through ``margin`` is an ``outcome`` test:
    ``pytest -m outcome`` runs them, as ``bench/margins.py`` does."""
    for item in items:
        if "margin" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.outcome)


@pytest.fixture(autouse=True)
def global_state_restored():
    """A test that trained must not hand its process-wide settings to the next one: CPU training
    flushes denormals to zero for speed (``accel.make_accelerator``), and accelerate keeps one
    state per process (its mixed precision, its dataloaders' gradient state). Cleared the way
    accelerate's own ``AccelerateTestCase`` clears it, so no test passes only after another."""
    yield
    torch.set_flush_denormal(False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accel._precision_in_use.clear()


@pytest.fixture(autouse=True)
def allocator_untouched(monkeypatch):
    """A tight memory plan fixes glibc's mmap threshold for the rest of its process, which
    cannot be undone and slows every later training step: in the suite it is only said to be
    set (``test_plan`` checks the real setting in a process of its own)."""
    monkeypatch.setattr(memory, "return_freed_memory", lambda: True)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A tiny synthetic benchmark: 6 documents per task."""
    return synthesize(tmp_path_factory.mktemp("data") / "synth", seed=1 + SUITE_SEED,
                      docs_per_task=6, corpus_per_task=12, facts=8)


def unmemorised(record: dict) -> dict[str, float]:
    """Each task score of a built target that falls short of reproducing every row."""
    mem = record["memorisation"]
    scores = {f"{split} {task} {kind}": s[kind] for split in ("forget", "retain")
              for task, s in mem[split].items() for kind in ("regurgitation", "knowledge")}
    return {name: score for name, score in scores.items() if score < 1.0}


@pytest.fixture(scope="session")
def tiny_target(synth_dir, tmp_path_factory):
    """The target some 40 outcome tests unlearn: it must have memorised every row, or what
    they measure is not forgetting."""
    out = tmp_path_factory.mktemp("models") / "target"
    record = build_target(synth_dir, out, preset="tiny", seed=SUITE_SEED)
    short = unmemorised(record)
    assert not short, f"the shared tiny target did not memorise every row: {short}"
    return out, record
