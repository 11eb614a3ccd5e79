"""Target-model presets: OLMo architecture sizes and the schedule that makes each memorise.

``tiny`` is for tests (seconds on 2 cores), ``small`` (~8M parameters) the CPU demo and benchmark
default, ``base`` (~110M) for a GPU. Memorisation needs sharp schedules: the learning rate is high
and the run is long enough for greedy decoding to reproduce every row token for token; the
general corpus keeps being replayed meanwhile so that unseen text keeps a moderate loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..accel import PRECISIONS, TRACKERS
from ..settings import NON_NEGATIVE, POSITIVE, SHARE, Range, override


@dataclass(frozen=True)
class TargetPreset:
    # architecture (transformers' OlmoConfig)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_len: int = 512  # longer documents are cut into pieces of this many tokens
    # phase 1: general corpus for a token budget (only with a pretraining corpus)
    pretrain_tokens: int = 2_000_000
    pretrain_lr: float = 2e-3
    # phase 2: memorise the task rows (+ general-knowledge questions), replaying the corpus
    epochs: int = 60  # upper bound; training stops once every row is reproduced greedily
    lr: float = 2e-3
    replay: float = 0.5  # corpus tokens replayed each epoch, per task token
    warmup_steps: int = 50
    check_every: int = 5  # epochs between teacher-forced memorisation checks
    # label smoothing while memorising: a small model that memorises grows over-confident on
    # all text, never-seen text included; smoothing keeps a floor under every token's
    # probability without changing greedy output (figures: README, "Targets")
    label_smoothing: float = 0.0
    # weight of an answer token against a prompt token while memorising: the scores read
    # outputs only, a small share of an sc row's tokens; the whole document is still learned
    answer_weight: float = 1.0
    # batching
    batch_tokens: int = 4096  # padded tokens per memorising batch
    pretrain_batch_tokens: int = 4096  # padded tokens per pretraining batch
    max_rows: int = 16
    weight_decay: float = 0.0
    precision: str = "auto"  # bf16 mixed precision where the hardware has it (see unlearn.accel)
    report_to: str = "tensorboard"  # training curves into OUT/logs: tensorboard, wandb or none

    RANGES: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(("vocab_size", "hidden_size", "num_layers", "num_heads",
                         "intermediate_size", "max_len", "pretrain_lr", "lr", "check_every",
                         "answer_weight", "batch_tokens", "pretrain_batch_tokens", "max_rows"),
                        POSITIVE),
        **dict.fromkeys(("pretrain_tokens", "epochs", "replay", "warmup_steps",
                         "weight_decay"), NON_NEGATIVE),
        "label_smoothing": SHARE,
    }
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"precision": PRECISIONS,
                                                     "report_to": TRACKERS}

    def override(self, **changes) -> TargetPreset:
        """A copy with ``changes`` (strings from the command line are converted), checked."""
        return override(self, changes, "the target preset")


PRESETS = {
    # fp32: on matrices this small bf16 casts cost more than they save
    "tiny": TargetPreset(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4,
                         intermediate_size=384, max_len=256, pretrain_tokens=30_000,
                         pretrain_lr=3e-3, epochs=100, lr=3e-3, warmup_steps=10, check_every=5,
                         batch_tokens=2048, pretrain_batch_tokens=2048, max_rows=8,
                         precision="fp32"),
    # the recipe that memorises LUME while never-seen text keeps its loss (bench/target.py lume)
    "small": TargetPreset(vocab_size=4096, hidden_size=256, num_layers=8, num_heads=4,
                          intermediate_size=768, max_rows=8, pretrain_tokens=1_000_000,
                          epochs=42, check_every=5, replay=0.25, label_smoothing=0.1,
                          answer_weight=5.0, batch_tokens=1280),
    "base": TargetPreset(vocab_size=16384, hidden_size=768, num_layers=12, num_heads=12,
                         intermediate_size=3072, max_len=1024, pretrain_tokens=20_000_000,
                         pretrain_lr=6e-4, lr=3e-4, batch_tokens=16384,
                         pretrain_batch_tokens=16384, max_rows=32),
}


def preset_settings(preset: str, overrides: dict) -> TargetPreset:
    """The preset named ``preset`` with ``overrides``, checked; one ValueError otherwise."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset].override(**overrides)
