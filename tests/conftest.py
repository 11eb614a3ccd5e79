import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people, not test logs

import pytest
import torch

from unlearn import accel
from unlearn.data import synthesize
from unlearn.target import build_target


@pytest.fixture(scope="session", autouse=True)
def fp32_on_every_cpu():
    """``precision="auto"`` trains in fp32 here whatever the CPU: with AVX512-BF16 or AMX it
    would be bf16, and every threshold in this suite would move with the machine CI lands on.
    A test of bf16 asks for ``precision="bf16"``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accel, "cpu_has_bf16", lambda: False)
        yield


@pytest.fixture(autouse=True)
def denormals_restored():
    """CPU training flushes denormals to zero for speed (``accel.make_accelerator``); a test
    that trained must not hand that setting to the next one."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A tiny synthetic benchmark: 6 documents per task."""
    return synthesize(tmp_path_factory.mktemp("data") / "synth", seed=1, docs_per_task=6,
                      pretrain_factor=2, facts=8)


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
    record = build_target(synth_dir, out, preset="tiny", seed=0)
    short = unmemorised(record)
    assert not short, f"the shared tiny target did not memorise every row: {short}"
    return out, record
