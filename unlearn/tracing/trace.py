"""Causal tracing (Meng et al. 2022, ROME): which layers, at which token, carry a fact.

For a fact "What is {subject}'s {attribute}?" → first answer token, the subject's input
embeddings are corrupted with Gaussian noise and the answer's probability collapses; restoring
one clean hidden state (a layer's whole output, or its MLP or attention output over a window of
layers) at one position brings some of it back. That recovered probability, the *indirect
effect*, is measured for every (position, layer) and averaged over facts by position group.
SHA256 (2nd on SemEval-2025 Task 4's 1B track) ran this on LUME's Task2 facts to pick the MLP
layers to unlearn in.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from ..data.lume import Row
from ..models.layers import block, decoder_layers

KINDS = ("residual", "mlp", "attn")
GROUPS = ("before subject", "first subject token", "middle subject tokens",
          "last subject token", "after subject", "last token")
_QUESTIONS = (re.compile(r"^What is the (?P<attribute>.+?) of (?P<subject>.+?)\?$"),
              re.compile(r"^What is (?P<subject>.+?)'s (?P<attribute>.+?)\?$"))


@dataclass(frozen=True)
class Fact:
    id: str
    prompt: str
    subject: str
    answer: str


def facts_from(rows: list[Row]) -> list[Fact]:
    """Task2 questions rewritten as "What is {subject}'s {attribute}?" (the subject is the
    person's name, found in the question); questions of another shape are left out."""
    facts = []
    for r in rows:
        if r.task != "Task2" or r.kind != "qa":
            continue
        for pattern in _QUESTIONS:
            m = pattern.match(r.input.strip())
            if m:
                subject, attribute = m["subject"], m["attribute"]
                facts.append(Fact(r.id, f"What is {subject}'s {attribute}?", subject, r.output))
                break
    return facts


@dataclass
class Encoded:
    ids: torch.Tensor  # (1, positions)
    subject: tuple[int, int]  # token span [start, end) of the subject
    target: int  # the answer's first token


def encode(tokenizer, fact: Fact) -> Encoded | None:
    enc = tokenizer(fact.prompt, return_offsets_mapping=True)
    start = fact.prompt.index(fact.subject)
    end = start + len(fact.subject)
    span = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    full = tokenizer(fact.prompt + " " + fact.answer).input_ids
    if not span or len(full) <= len(enc.input_ids):
        return None
    return Encoded(torch.tensor([enc.input_ids]), (span[0], span[-1] + 1),
                   full[len(enc.input_ids)])


def _modules(model, kind: str) -> list[torch.nn.Module]:
    layers = decoder_layers(model)
    if kind == "residual":
        return list(layers)
    return [block(layer, kind) for layer in layers]


def _replace(output, new):
    """Put ``new`` in place of a module's hidden-state output (attention returns a tuple)."""
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _hooks(pairs):
    with ExitStack() as stack:
        for module, hook in pairs:
            stack.callback(module.register_forward_hook(hook).remove)
        yield


class Tracer:
    """Traces facts through one model. ``noise`` is the standard deviation of the Gaussian added
    to subject-token embeddings (3 × their empirical standard deviation by default, as ROME)."""

    def __init__(self, model, noise: float, samples: int = 10, window: int = 10, seed: int = 0):
        self.model, self.noise, self.samples, self.window = model, noise, samples, window
        self.n_layers = len(decoder_layers(model))
        self.generator = torch.Generator().manual_seed(seed)
        self.embed = model.get_input_embeddings()

    def _window(self, kind: str, layer: int) -> range:
        if kind == "residual":
            return range(layer, layer + 1)
        half = self.window // 2
        return range(max(0, layer - half), min(self.n_layers, layer + self.window - half))

    @torch.no_grad()
    def clean(self, fact: Encoded) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
        """Every module's clean output and the clean next-token distribution."""
        states = {kind: [None] * self.n_layers for kind in KINDS}

        def keep(kind, layer):
            def hook(module, args, output):
                states[kind][layer] = _hidden(output)[0].clone()
            return hook

        pairs = [(m, keep(kind, i)) for kind in KINDS
                 for i, m in enumerate(_modules(self.model, kind))]
        with _hooks(pairs):
            logits = self.model(input_ids=fact.ids.to(self.model.device),
                                logits_to_keep=1).logits[0, -1]
        return states, logits.float().softmax(-1)

    @torch.no_grad()
    def trace(self, fact: Encoded) -> dict:
        """Probabilities of the answer token: clean, corrupted, and restored per (kind,
        position, layer), averaged over the noise samples."""
        states, clean_probs = self.clean(fact)
        positions = fact.ids.shape[1]
        s, e = fact.subject
        noise = torch.randn((self.samples, e - s, self.embed.embedding_dim),
                            generator=self.generator) * self.noise

        def corrupt(rows: int):
            def hook(module, args, output):
                out = output.clone()
                out[:, s:e] += noise.repeat(rows // self.samples, 1, 1).to(out)
                return out
            return hook

        def run(rows: int, extra=()) -> torch.Tensor:
            ids = fact.ids.repeat(rows, 1).to(self.model.device)
            with _hooks([(self.embed, corrupt(rows)), *extra]):
                logits = self.model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
            return logits.softmax(-1)[:, fact.target]

        corrupted = run(self.samples).mean().item()
        restored = {kind: torch.zeros(positions, self.n_layers) for kind in KINDS}
        rows = positions * self.samples  # row = position * samples + sample
        where = torch.arange(positions).repeat_interleave(self.samples)
        for kind in KINDS:
            modules = _modules(self.model, kind)
            for layer in range(self.n_layers):
                def restore(kind_layer, kind=kind):
                    clean_state = states[kind][kind_layer]

                    def hook(module, args, output):
                        hidden = _hidden(output).clone()
                        hidden[torch.arange(rows), where] = clean_state[where].to(hidden)
                        return _replace(output, hidden)
                    return hook

                extra = [(modules[i], restore(i)) for i in self._window(kind, layer)]
                probs = run(rows, extra).view(positions, self.samples).mean(1)
                restored[kind][:, layer] = probs.cpu()
        return {"clean": clean_probs[fact.target].item(), "corrupted": corrupted,
                "restored": restored}


def position_groups(positions: int, subject: tuple[int, int]) -> dict[str, list[int]]:
    """Token positions of each group. The last subject token is ``end - 1`` (the tracing code
    SHA256 adapted took the first subject token here by mistake)."""
    s, e = subject
    return {"before subject": list(range(0, s)), "first subject token": [s],
            "middle subject tokens": list(range(s + 1, e - 1)), "last subject token": [e - 1],
            "after subject": list(range(e, positions - 1)), "last token": [positions - 1]}


def subject_noise(model, tokenizer, facts: list[Encoded], scale: float = 3.0) -> float:
    """``scale`` × the standard deviation of the subject tokens' input embeddings."""
    embed = model.get_input_embeddings().weight
    ids = torch.cat([f.ids[0, f.subject[0]:f.subject[1]] for f in facts])
    return scale * embed[ids.to(embed.device)].float().std().item()


def choose_layers(effect: list[float], share: float = 0.6) -> list[int]:
    """The smallest contiguous block of layers holding ``share`` of the (positive) MLP indirect
    effect at the last subject token; among blocks that small, the one holding the most."""
    values = [max(0.0, v) for v in effect]
    total = sum(values)
    if total <= 0:
        return list(range(len(values)))
    for width in range(1, len(values) + 1):
        sums = [(sum(values[i:i + width]), i) for i in range(len(values) - width + 1)]
        best, start = max(sums, key=lambda t: (t[0], -t[1]))
        if best >= share * total - 1e-12:
            return list(range(start, start + width))
    return list(range(len(values)))


ANSWERS = ("expected", "predicted")


def check_answers(answers: str) -> None:
    if answers not in ANSWERS:
        raise ValueError(f"answers={answers!r}: use one of {', '.join(ANSWERS)}")


def _traced(model, tokenizer, facts: list[Fact], answers: str) -> list[tuple[Fact, Encoded]]:
    """The facts to trace and the answer token each is traced on. ``expected``: the facts the
    model answers right at top-1, on the data's answer (``causal_trace.py`` with ``expect``);
    ``predicted``: every fact, on the model's own top-1 token (ROME without ``expect``: a
    model that has memorised nothing, such as a scale rehearsal's, can still be traced)."""
    check_answers(answers)
    encoded = [(f, enc) for f in facts if (enc := encode(tokenizer, f)) is not None]
    model.eval()
    traced = []
    with torch.no_grad():
        for f, enc in encoded:
            top = int(model(input_ids=enc.ids.to(model.device), logits_to_keep=1).logits.argmax())
            if answers == "predicted":
                traced.append((f, replace(enc, target=top)))
            elif top == enc.target:
                traced.append((f, enc))
    if not traced:
        raise ValueError(f"none of the {len(facts)} Task2 facts is answered right (top-1) by the "
                         "model; trace a model that has memorised them (or trace its own "
                         "answers: answers='predicted', --answers predicted)")
    return traced


def trace_facts(model, tokenizer, facts: list[Fact], samples: int = 10, window: int = 10,
                noise_scale: float = 3.0, seed: int = 0, answers: str = "expected") -> dict:
    """Trace the facts :func:`_traced` picks by ``answers``; average effects by position group."""
    known = _traced(model, tokenizer, facts, answers)
    noise = subject_noise(model, tokenizer, [enc for _, enc in known], noise_scale)
    tracer = Tracer(model, noise, samples, window, seed)
    n_layers = tracer.n_layers
    sums = {k: torch.zeros(len(GROUPS), n_layers) for k in KINDS}
    counts = torch.zeros(len(GROUPS))
    clean, corrupted = [], []
    for _, enc in tqdm(known, desc="causal tracing", unit="fact"):
        result = tracer.trace(enc)
        clean.append(result["clean"])
        corrupted.append(result["corrupted"])
        groups = position_groups(enc.ids.shape[1], enc.subject)
        for g, name in enumerate(GROUPS):
            if groups[name]:
                counts[g] += 1
                for k in KINDS:
                    effect = result["restored"][k][groups[name]] - result["corrupted"]
                    sums[k][g] += effect.mean(0)
    effects = {k: (sums[k] / counts.clamp(min=1)[:, None]).tolist() for k in KINDS}
    return {"facts": len(facts), "facts_used": len(known), "answers": answers,
            "facts_skipped": len(facts) - len(known), "layers": n_layers, "groups": list(GROUPS),
            "facts_per_group": counts.tolist(), "samples": samples, "window": window,
            "noise_std": noise, "clean_probability": sum(clean) / len(clean),
            "corrupted_probability": sum(corrupted) / len(corrupted), "indirect_effect": effects}
