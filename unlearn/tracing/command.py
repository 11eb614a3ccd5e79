"""``unlearn locate``: trace a model's Task2 facts, write ``trace.json`` and heatmaps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..data import load_lume  # noqa: E402
from ..io import LOCATE, atomic_directory, claim_output, write_json  # noqa: E402
from ..measure.memory import (  # noqa: E402
    MemoryPlan,
    meta_model,
    plan_inference,
    require_inference_fit,
    token_lengths,
)
from ..models.layers import decoder_layers  # noqa: E402
from ..models.loading import (  # noqa: E402
    best_device,
    check_model_dir,
    inference_dtype,
    load_model,
    load_tokenizer,
)
from ..settings import check_seed  # noqa: E402
from .trace import (  # noqa: E402
    GROUPS,
    KINDS,
    check_answers,
    choose_layers,
    facts_from,
    trace_facts,
)

TITLES = {"residual": "whole layer output (residual)", "mlp": "MLP output, window",
          "attn": "attention output, window"}


def heatmap(effects: list[list[float]], kind: str, path: Path, window: int) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    image = ax.imshow(effects, aspect="auto", cmap={"residual": "Purples", "mlp": "Greens",
                                                    "attn": "Reds"}[kind])
    ax.set_yticks(range(len(GROUPS)), GROUPS)
    ax.set_xlabel("layer" + ("" if kind == "residual" else f" (centre of {window})"))
    ax.set_title(f"indirect effect: {TITLES[kind]}")
    fig.colorbar(image, ax=ax, label="p restored − p corrupted")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def memory_plan(model, facts, samples: int, dtype) -> MemoryPlan:
    """What tracing holds at its peak, planned before any weight loads: a fact's every
    position restored at once, ``samples`` noisy rows each (positions × samples rows of the
    longest prompt, one position's logits each). Refuses a plan that cannot fit; prints it
    and the work ahead (tracing's time is its forwards: one per fact, kind and layer)."""
    positions = max(token_lengths(load_tokenizer(model), [f.prompt for f in facts]))
    plan = plan_inference(model, dtype, forward=positions * samples * positions,
                          last_logits=positions * samples)
    require_inference_fit(plan, "unlearn locate")
    print(plan.table())
    forwards = len(facts) * len(KINDS) * len(decoder_layers(meta_model(model)))
    print(f"tracing up to {len(facts)} fact{'s' * (len(facts) != 1)}: {forwards} forwards of up to "
          f"{positions * samples} rows x {positions} tokens")
    return plan


def locate(model: str | Path, data: str | Path, out: str | Path, samples: int = 10,
           window: int = 10, share: float = 0.6, noise_scale: float = 3.0,
           max_facts: int | None = None, seed: int = 0, split: str | None = None,
           dtype: str = "auto", answers: str = "expected") -> dict:
    """Causal tracing of the Task2 facts in ``data`` through ``model``.

    Writes ``out/trace.json`` (indirect effects per kind, position group and layer; facts used;
    the chosen layers) and ``out/{mlp,attn,residual}.png``. The layer choice: the smallest
    contiguous block of layers holding ``share`` of the MLP indirect effect at the last
    subject token. ``split`` chooses one data split where ``data`` holds several (the
    official parquet snapshot); ``dtype`` what the model computes in (as ``unlearn eval
    --dtype``). ``answers``: ``expected`` traces the facts the model answers right, on their
    answers (as SHA256's ``causal_trace.py``); ``predicted`` every fact, on the model's own
    top-1 token. Returns the trace record.
    """
    started = time.perf_counter()
    check_seed(seed)
    check_answers(answers)
    claim_output(out, LOCATE, {"--model": model, "--data": data}, lock=False)
    check_model_dir(model)
    compute = inference_dtype(dtype)
    lume = load_lume(data, split)
    facts = facts_from(lume.rows)
    if not facts:
        raise ValueError(f"{data}: no Task2 question of the form 'What is the X of NAME?' or "
                         f"'What is NAME's X?' to trace")
    facts = facts[:max_facts] if max_facts else facts
    plan = memory_plan(model, facts, samples, compute)
    claim_output(out, LOCATE, {"--model": model, "--data": data})  # now locked
    lm, tokenizer = load_model(model, dtype=compute, device=best_device())
    record = trace_facts(lm, tokenizer, facts, samples, window, noise_scale, seed, answers)
    last_subject = record["indirect_effect"]["mlp"][GROUPS.index("last subject token")]
    record.update(model=str(model), data=str(data), share=share, dtype=str(compute),
                  layers_chosen=choose_layers(last_subject, share),
                  rule=f"smallest contiguous block of layers holding {share:.0%} of the positive "
                       f"MLP indirect effect at the last subject token",
                  memory_plan=plan.as_record(),
                  seconds=time.perf_counter() - started)
    with atomic_directory(out, LOCATE) as tmp:
        for kind in KINDS:
            heatmap(record["indirect_effect"][kind], kind, tmp / f"{kind}.png", window)
        write_json(tmp / "trace.json", record)
    return record


def read_layers(trace: str | Path) -> list[int]:
    """The layers a ``trace.json`` (or the directory holding it) chose."""
    path = Path(trace)
    path = path / "trace.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path}: no trace.json; run `unlearn locate` first or give layers "
                         f"explicitly")
    return json.loads(path.read_text())["layers_chosen"]
