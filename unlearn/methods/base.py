"""What every unlearning method shares: its settings, the registry, and the batch it sees.

A method is a small class in its own module: a config dataclass (defaults from its paper) and a
``loss`` over one micro-batch. Everything else (data, which parameters train, LoRA, optimizer,
schedule, accumulation, checkpoints) is the engine's (:mod:`unlearn.engine`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..accel import PRECISIONS, TRACKERS
from ..models.layers import check_layer_spec
from ..models.loading import saved_dtype
from ..settings import NON_NEGATIVE, POSITIVE, SHARE, Range
from ..settings import override as override_settings
from ..training import SCHEDULES
from .losses import Batch, Reference

# how a run chooses the model it keeps (unlearn.selection)
SELECT_RULES = ("auto", "score", "mia", "knowledge", "none")
# what an unlearned model may be saved in besides its source's dtype (output_dtype)
OUTPUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def output_dtype(config: UnlearnConfig, source: Path) -> torch.dtype:
    """What an unlearned model is saved in: its ``source``'s dtype (a bf16 checkpoint comes back
    bf16, not twice its size in fp32), unless ``config.output_dtype`` asks for another."""
    if config.output_dtype == "source":
        return saved_dtype(source)
    return OUTPUT_DTYPES[config.output_dtype]


@dataclass(frozen=True)
class UnlearnConfig:
    """Settings shared by every method. Each method's config subclasses this and sets its paper's
    defaults; ``small_target`` then adjusts them for the small from-scratch targets.

    Which parameters train: ``layers`` is ``all``, ``last:K``, a list of indices and ranges
    (``0-5``, ``0,3,5``) or ``auto``: the layers ``unlearn locate`` chose, read from the
    ``trace`` file. ``modules`` is ``all``, ``mlp``, ``attn`` (those blocks of the chosen
    layers only) or a comma list of module names (``down_proj``). Everything outside the
    chosen layers (embeddings, final norm) stays frozen unless ``layers=all`` and
    ``modules=all``, or ``train_outside``.

    ``validation`` names a LUME directory: after each epoch the joint loss on it (CE of its
    retain rows minus CE of its forget rows) is recorded and the best epoch's weights are kept.

    ``forget_target`` bounds the ascent of methods that raise the forget rows' loss (ga, gd, kl,
    sugd, sha256): each forget row's output loss and whole-text loss are drawn towards a level
    (:func:`~unlearn.methods.losses.forget_term`) rather than raised without end, which
    overshoots until the forgotten documents stand out as much as remembered ones. ``auto``
    aims at never-seen text: the median NLL of the MIA non-members the run calibrates on, before
    the first step and again at every selection check (unbounded without an MIA set); ``none``
    is the papers' unbounded ascent; a number is a fixed loss to aim at.

    ``teacher`` names the model the source was fine-tuned from, which never saw the documents
    (``auto``: the base a target built by ``unlearn target`` memorised from, its ``base``).
    With one, ``forget_target=auto`` draws each forget row to the teacher's predictions over its
    whole text (KL(teacher ‖ model)) instead of aiming at a level; ``teacher_floor`` also raises
    each of the row's tokens to the NLL the teacher gives it, and no further
    (:func:`~unlearn.methods.losses.token_floor`: the KL alone all but stops pulling on a
    memorised token the model still finds far likelier than the teacher does).

    ``anchor_weight`` holds general text where it was (:mod:`unlearn.anchor`): the source model
    writes ``anchor_samples`` passages of its own before the first step, and every micro-batch
    adds that weight times the rise of their loss above its start. 0 (the default) trains the
    method alone.

    ``select`` chooses the model a run keeps (:mod:`unlearn.selection`): ``score``, the
    default whenever the run is given an MIA set, keeps the model with the best estimated final
    score, checked every ``select_every`` steps (0: about 12 checks over the run, or over a staged
    method's last stage), and stops once ``select_patience`` checks in a row found no better
    one (counted from the first model better than the start); ``mia`` keeps the model whose
    loss-MIA AUC is closest to 0.5; ``knowledge`` stops once no more than ``select_knowledge``
    of the forget questions are answered; ``none`` trains the fixed schedule. ``score`` and
    ``mia`` calibrate on a seeded ``select_split`` share of the MIA set (``run.json`` lists
    those documents: score the MIA on the others).
    """

    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    # rows: each micro-batch's loss weighted by its share of the step's rows, so accumulation
    # gives the whole batch's gradient; micro_batches: each by 1/grad_accum, as HF's Trainer
    # (SHA256's code) weighs them, a short micro-batch counting as much as a full one
    accumulation: str = "rows"
    schedule: str = "linear"  # linear | cosine | constant, after warm-up
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    layers: str = "all"
    modules: str = "all"
    # the embeddings, final norm and LM head train beside the chosen layers: what SUGD's code
    # does, whose last-k freeze touches the decoder layers alone (with LoRA only adapters train,
    # there as here)
    train_outside: bool = False
    trace: str = ""  # trace.json (or its directory) for layers=auto
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj,up_proj,down_proj"
    retain_weight: float = 1.0  # weight of the retain term (methods that have one)
    forget_target: str = "auto"  # auto | none | a loss: where ascent aims (see above)
    teacher: str = "none"  # none | auto | a model directory: forget rows drawn to it (see above)
    teacher_floor: bool = True  # and each of their tokens raised to the teacher's NLL (see above)
    anchor_weight: float = 0.0  # weight of the hold on general text (0: none; see above)
    anchor_samples: int = 32  # passages the source model writes for that hold
    max_len: int = 512  # tokens per training row; longer rows are cut
    retain_eos: bool = True  # retain rows end in EOS, as the target learned them
    output_dtype: str = "source"  # source | fp32 | bf16: the dtype the unlearned model is saved in
    precision: str = "auto"  # bf16 mixed precision on a GPU or a bf16 CPU, else fp32
    report_to: str = "tensorboard"  # training curves into OUT/logs: tensorboard, wandb or none
    # recompute each layer's activations in the backward pass instead of keeping them: less
    # memory for about a third more compute (what lets long rows or big batches fit a 7B)
    gradient_checkpointing: bool = False
    validation: str = ""  # LUME directory for keeping the best epoch
    select: str = "auto"  # auto | score | mia | knowledge | none (auto: score with an MIA set)
    select_every: int = 0  # steps between checks; 0: about SELECT_CHECKS (see above)
    select_patience: int = 4  # checks without a better model before stopping (0: never)
    select_split: float = 0.3  # share of the MIA set held out to calibrate on
    select_rows: int = 8  # score: rows sampled per split, task and kind (0: every row)
    select_sc_tokens: int = 32  # score: tokens generated (and compared) per sc row
    select_knowledge: float = 0.0  # knowledge: stop once forget QA exact match <= this
    select_audit: bool = False  # score: also record the full evaluation at every check

    RANGES: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(("epochs", "lr", "batch_size", "grad_accum", "max_len", "lora_r",
                         "lora_alpha", "anchor_samples"), POSITIVE),
        **dict.fromkeys(("weight_decay", "max_grad_norm", "retain_weight", "anchor_weight",
                         "select_every",
                         "select_patience", "select_rows"), NON_NEGATIVE),
        **dict.fromkeys(("warmup_ratio", "lora_dropout", "select_knowledge"), SHARE),
        "select_split": Range(0, 1, low_open=True), "select_sc_tokens": POSITIVE,
    }
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "schedule": SCHEDULES, "precision": PRECISIONS, "select": SELECT_RULES,
        "accumulation": ("rows", "micro_batches"), "output_dtype": ("source", *OUTPUT_DTYPES),
        "report_to": TRACKERS}

    def override(self, **changes) -> UnlearnConfig:
        """A copy with ``changes`` (strings from the command line are converted), checked:
        one clear error for a setting of the wrong type or out of range (``chunk_size=0``)."""
        changed = override_settings(self, changes, type(self).__name__)
        check_layer_spec(changed.layers)
        _check_forget_target(changed.forget_target)
        return changed


def _check_forget_target(value: str) -> None:
    if value in ("auto", "none"):
        return
    try:
        level = float(value)
    except ValueError:
        level = None
    if level is None or not 0 < level < float("inf"):
        raise ValueError(f"forget_target={value}: use auto, none or a positive loss (6.2)")


@dataclass(frozen=True)
class Example:
    """One training row: its token ids, where its output starts, and which set it came from."""

    ids: tuple[int, ...]
    start: int  # index of the first output token (the prompt before it is masked)
    forget: bool
    index: int  # its row's index in its split


class Method:
    """Base class. Subclasses set ``name``, ``Config`` and implement :meth:`loss`."""

    name: ClassVar[str]
    Config: ClassVar[type[UnlearnConfig]] = UnlearnConfig
    #: adjustments to the paper's defaults for small from-scratch targets (see README)
    small_target: ClassVar[dict] = {}
    #: further adjustments for a small target whose base unlearn kept (a teacher exists)
    small_target_with_teacher: ClassVar[dict] = {}
    #: what the method reads of the frozen source model (:data:`losses.NEEDS`): "logits"
    #: (KL), "hidden" (RMU), "forget_logprob" (NPO)
    reference: ClassVar[tuple[str, ...]] = ()
    #: rows one micro-batch holds per ``batch_size`` row: the default :meth:`stages` pairs each
    #: forget row with a retain row (2); methods whose steps hold ``batch_size`` rows in all set 1
    rows_per_batch_row: ClassVar[int] = 2

    def __init__(self, config: UnlearnConfig):
        self.config = config

    def procedure(self, run: Callable[..., dict], model_dir: Path, data, out: Path,
                  **options) -> dict | None:
        """The hook for a method that is a procedure over other runs rather than one loss
        (merge: two adapters trained, then combined). ``run`` is :func:`unlearn.run`, handed
        in by the engine so that no method imports the engine; ``options`` are the run's
        (``seed``, ``eval_every``, ``eval_points``, ``profile``, ``mia``, ``mmlu``, ``split``).
        Such a method writes ``out`` itself and returns its ``run.json`` record; an ordinary method
        returns None and the engine trains its :meth:`loss`."""
        return None

    def stages(self, forget: list[Example], retain: list[Example],
               rng: random.Random) -> list[list[list[list[Example]]]]:
        """``stages[s][epoch][step]`` = the rows of one optimizer step. The default: one stage;
        every epoch the forget set shuffled into batches, each paired with as many retain rows
        drawn in a shuffled cycle."""
        c = self.config
        per_step = c.batch_size * c.grad_accum
        retain_cycle = _Cycle(retain, rng)
        epochs = []
        for _ in range(c.epochs):
            order = rng.sample(forget, len(forget))
            steps = []
            for i in range(0, len(order), per_step):
                chunk = order[i:i + per_step]
                steps.append(chunk + (retain_cycle.take(len(chunk)) if retain else []))
            epochs.append(steps)
        return [epochs]

    def micro_batches(self, step: list[Example]) -> list[list[Example]]:
        """A step's micro-batches: each holds its share of the step's forget and of its retain
        rows, so a loss that averages over rows gives the whole step's gradient."""
        k = self.config.grad_accum
        forget = [e for e in step if e.forget]
        retain = [e for e in step if not e.forget]
        micro = [forget[i::k] + retain[i::k] for i in range(k)]
        return [m for m in micro if m]

    def loss(self, model, batch: Batch, ref: Reference) -> torch.Tensor:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch with its index within its stage."""

    def state(self) -> dict:
        """What the method learned while training (saved with checkpoints, for resuming)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass


class _Cycle:
    """Retain rows in a shuffled order, reshuffled each time round."""

    def __init__(self, rows: list, rng: random.Random):
        self.rows, self.rng, self.queue = rows, rng, []

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            if not self.queue:
                self.queue = self.rng.sample(self.rows, len(self.rows))
            out.append(self.queue.pop())
        return out


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
