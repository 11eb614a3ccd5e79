"""Loss machinery every method shares: a padded batch with the prompt masked, the loss over
output tokens per row, and the frozen reference model."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..accel import frozen_dtype, prepare_frozen, zero3
from ..models.forward import next_token_nll
from ..models.loading import load_model
from ..models.sequences import IGNORE, from_start, pad


@dataclass
class Batch:
    """Rows padded on the right; ``labels`` hold only output tokens (prompt and padding are
    ``IGNORE``); ``forget`` marks the rows to unlearn; ``rows`` index the split each came from."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    forget: torch.Tensor
    rows: list[int]

    @classmethod
    def of(cls, examples: list, pad_id: int, device) -> Batch:
        ids, mask = pad([list(e.ids) for e in examples], pad_id)
        prompt = ~from_start([e.start for e in examples], ids.shape[1], ids.device)
        labels = ids.masked_fill((mask == 0) | prompt, IGNORE)
        forget = torch.tensor([e.forget for e in examples], dtype=torch.bool)
        return cls(ids.to(device), mask.to(device), labels.to(device), forget.to(device),
                   [e.index for e in examples])

    @property
    def retain(self) -> torch.Tensor:
        return ~self.forget


@dataclass
class Outputs:
    """A forward pass: logits, and per row the summed and mean NLL of its output tokens, and the
    mean NLL of its whole text (prompt included: the statistic the loss-MIA reads)."""

    logits: torch.Tensor  # (rows, positions - 1, vocab), aligned with the shifted labels
    nll_sum: torch.Tensor  # (rows,)
    tokens: torch.Tensor  # (rows,) output tokens scored
    text_nll: torch.Tensor  # (rows,)
    token_nll: torch.Tensor | None = None  # (rows, positions - 1): each token's, 0 on padding

    @property
    def nll(self) -> torch.Tensor:
        """Mean NLL over each row's output tokens (the ``loss`` HF reports for one row)."""
        return self.nll_sum / self.tokens.clamp(min=1)


def forward(model, batch: Batch) -> Outputs:
    logits, token_nll = next_token_nll(model, batch.ids, batch.mask)
    token_nll = token_nll[:, :-1]  # the last position predicts nothing
    scored = batch.labels[:, 1:] != IGNORE  # output tokens: labels equal ids there
    real = batch.mask[:, 1:].bool()
    return Outputs(logits[:, :-1], (token_nll * scored).sum(1), scored.sum(1),
                   token_nll.sum(1) / real.sum(1).clamp(min=1), token_nll)


def mean_over(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the selected rows; 0 (with a gradient path) when none is.
    Unselected rows never enter, so a value undefined for them (NaN) cannot leak in."""
    if not rows.any():
        return values[rows].sum()  # an empty sum: 0, still attached to the graph
    return values[rows].mean()


def forget_term(out: Outputs, batch: Batch, ref: Reference) -> torch.Tensor:
    """Each row's forget objective (meaningful on forget rows; the caller selects them).

    - With a ``ref.teacher`` (the model before it was fine-tuned on the documents): the mean
      over the row's tokens, prompt included, of KL(teacher ‖ model) and (``teacher_floor``) of
      how far each token's NLL lies below the teacher's (:meth:`Reference.teacher_term`). The
      row is drawn to what a model that never saw it predicts, and no further: its loss lands
      where never-seen text of its kind sits, instead of ascending without end.
    - With a ``ref.forget_level``: |NLL(output) − level| + |NLL(whole text) − level|, the
      output forgotten and the row's text drawn to the loss of never-seen text. Left below it
      the document is remembered; pushed far above it, it stands out again to a loss-MIA.
    - Otherwise the papers' ascent on its output tokens (−NLL).
    """
    if ref.teacher is not None:
        return ref.teacher_term(out, batch)
    if ref.forget_level is None:
        return -out.nll
    return (out.nll - ref.forget_level).abs() + (out.text_nll - ref.forget_level).abs()


def npo_term(out: Outputs, batch: Batch, ref: Reference, beta: float) -> torch.Tensor:
    """NPO's term per row, ``−(2/β)·log σ(−β·(log π_θ(y|x) − log π_ref(y|x)))`` with the
    log-probabilities summed over output tokens: GA's gradient, weighted down for rows already
    pushed below the reference (meaningful on forget rows; the caller selects them)."""
    log_ratio = ref.nll_sum_of(batch) - out.nll_sum  # log π_θ − log π_ref
    return -(2 / beta) * F.logsigmoid(-beta * log_ratio)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary, in float32."""
    return F.log_softmax(logits.float(), -1)


def kl_of_log_probs(ref_log_probs: torch.Tensor, model_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) at each position of two aligned log-probability tensors."""
    return F.kl_div(model_log_probs, ref_log_probs, log_target=True, reduction="none").sum(-1)


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) at each position of two aligned logit tensors (float32)."""
    return kl_of_log_probs(log_probs(ref_logits), log_probs(logits))


def token_floor(teacher_log_probs: torch.Tensor, model_nll: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
    """How far the model's NLL of each of ``tokens`` (``model_nll``, aligned with them) lies
    below the teacher's, 0 where it does not.

    KL(teacher ‖ model) weighs a token by the teacher's probability of it: once the model gives
    a memorised name a few percent, against the teacher's thousandth, the KL's pull on it has
    all but gone, and the document stays far more likely than never-seen text, which is what
    the loss-MIA reads. This term keeps pulling each token with the full gradient of its NLL
    until it is as unlikely as the teacher finds it, and not at all beyond."""
    teacher_nll = -teacher_log_probs.gather(-1, tokens[..., None]).squeeze(-1)
    return (teacher_nll - model_nll).clamp(min=0)


def kl_to_reference(out: Outputs, ref_logits: torch.Tensor, batch: Batch,
                    rows: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) per output token, averaged over the output tokens of ``rows``."""
    scored = (batch.labels[:, 1:] != IGNORE) & rows[:, None]
    if not scored.any():
        return out.logits.sum() * 0.0
    return token_kl(ref_logits[scored], out.logits[scored]).mean()


#: what a method may ask of the reference (its ``Method.reference``): the frozen model's
#: "logits" or "hidden" states during training, each forget ("forget_logprob") or retain row's
#: ("retain_logprob") summed output NLL under it, measured once before the first step, or the
#: "teacher" its forget rows are drawn to (:func:`forget_term`), when the run has one
NEEDS = ("logits", "hidden", "forget_logprob", "retain_logprob", "teacher")


class Reference:
    """The model as it was before unlearning, frozen, prepared for what a method ``needs``.

    With LoRA it is the same network with the adapters switched off (no second copy in
    memory); otherwise a frozen copy is kept only when a method reads the reference's logits or
    hidden states during training. Forget rows' log-probabilities (NPO) are measured up front.
    """

    def __init__(self, needs: tuple[str, ...] = (), frozen=None, peft_model=None):
        unknown = set(needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"reference needs {sorted(unknown)}: known are {', '.join(NEEDS)}")
        self.needs = frozenset(needs)
        # one of them: a frozen copy of the source model, or the PEFT model in training
        self.frozen, self.peft_model = frozen, peft_model
        # (forget?, row) -> the row's summed output NLL under the source model
        self.source_nll_sum: dict[tuple[bool, int], float] = {}
        # the median NLL of never-seen text: where bounded ascent aims (forget_target)
        self.forget_level: float | None = None
        # the model before it was fine-tuned on the documents: forget rows are drawn to it
        self.teacher, self.teacher_on_every_row, self.teacher_floor = None, False, True

    def load_frozen_copy(self, accelerator, model_dir: Path, lora: bool) -> None:
        """Keep a frozen copy of the source model when the method reads it during training and
        LoRA cannot give it. A second load, not a deepcopy: under ZeRO-3 the model in hand is
        only this process's shard."""
        if self.needs & {"logits", "hidden"} and not lora:
            self.frozen = prepare_frozen(accelerator,
                                         load_model(model_dir, frozen_dtype(accelerator))[0])

    def rows_to_measure(self, forget: list, retain: list) -> list:
        """The rows whose source NLL the method reads (:meth:`measure_rows`)."""
        return ((forget if "forget_logprob" in self.needs else [])
                + (retain if "retain_logprob" in self.needs else []))

    @torch.no_grad()
    def measure_rows(self, model, batches: Iterable[Batch], accelerator) -> None:
        """Each row's summed output NLL under ``model`` (the source model, before any step);
        every process computes all of them (under ZeRO-3 each forward pass needs every
        process)."""
        model.eval()
        for batch in batches:
            with accelerator.autocast():
                nll_sum = forward(model, batch).nll_sum.tolist()
            self.source_nll_sum.update(zip(zip(batch.forget.tolist(), batch.rows), nll_sum))
        model.train()

    def load_teacher(self, accelerator, teacher_dir: Path | None, floor: bool = True) -> None:
        """Load the model before fine-tuning (see :func:`forget_term`), when the run has one
        (the engine gives one only to a method that reads it; ``models.loading.teacher_of``
        found it and checked its tokens); ``floor``: :meth:`teacher_term` adds
        :func:`token_floor`."""
        if teacher_dir is None:
            return
        self.teacher_floor = floor
        self.teacher = prepare_frozen(accelerator,
                                      load_model(teacher_dir, frozen_dtype(accelerator))[0])
        self.teacher_on_every_row = zero3(accelerator)

    @torch.no_grad()
    def _teacher_logits(self, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        # under ZeRO-3 every process runs every forward pass, whether it has forget rows or not
        keep = torch.ones_like(rows) if self.teacher_on_every_row else rows
        logits = self.teacher(input_ids=batch.ids[keep], attention_mask=batch.mask[keep],
                              use_cache=False).logits
        return logits[rows[keep], :-1]

    def teacher_term(self, out: Outputs, batch: Batch) -> torch.Tensor:
        """Per row, KL(teacher ‖ model) plus, with ``teacher_floor``, :func:`token_floor`,
        averaged over its real tokens, prompt included; 0 for retain rows (the teacher does not
        read them)."""
        rows = batch.forget
        term = out.text_nll * 0.0  # on the graph, so an all-retain batch still backpropagates
        if not rows.any() and not self.teacher_on_every_row:
            return term
        teacher, model = log_probs(self._teacher_logits(batch, rows)), log_probs(out.logits[rows])
        per_token = kl_of_log_probs(teacher, model)
        if self.teacher_floor:
            per_token = per_token + token_floor(teacher, out.token_nll[rows], batch.ids[rows, 1:])
        real = batch.mask[rows, 1:].float()
        return term.index_put((rows.nonzero(as_tuple=True)[0],),
                              (per_token * real).sum(1) / real.sum(1).clamp(min=1))

    def _frozen(self):
        if self.frozen is not None:
            return self.frozen, nullcontext()
        return self.peft_model, self.peft_model.disable_adapter()

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        net, context = self._frozen()
        with context:
            return net(input_ids=batch.ids, attention_mask=batch.mask,
                       use_cache=False).logits[:, :-1]

    @torch.no_grad()
    def hidden(self, batch: Batch, index: int) -> torch.Tensor:
        """``hidden_states[index]`` of the frozen model (0 = embeddings, i + 1 = after layer i)."""
        net, context = self._frozen()
        with context:
            return net(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False,
                       output_hidden_states=True).hidden_states[index]

    def nll_sum_of(self, batch: Batch) -> torch.Tensor:
        """The reference's summed output NLL of each row of ``batch`` it measured (the kinds
        the method needs), and 0 for the others: finite everywhere, because a NaN in a row a
        loss then leaves out would still turn its gradient to NaN (0 × NaN) on the way back."""
        keys = zip(batch.forget.tolist(), batch.rows)
        return torch.tensor([self.source_nll_sum.get(key, 0.0) for key in keys],
                            device=batch.ids.device)
