"""Model merging (ZJUKLAB, SemEval-2025 Task 4, "Unlearning via Model Merging"): two LoRA
adapters trained with the same objective (:mod:`npo_kl`) at different weights — one
over-forgets, one under-forgets — merged with PEFT's ``add_weighted_adapter`` (TIES by default:
trim to ``density``, elect signs, average agreeing values) and merged into the model. Their
paper: TIES far ahead of a linear merge (local final score 0.806 vs 0.244)."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel

from ..accel import process_state
from ..io import RUN, atomic_directory, write_json, writing
from ..models.loading import load_model
from ..settings import Range
from .base import Method, output_dtype, register
from .npo_kl import NPOKL, NPOKLConfig

COMBINATIONS = {"linear": "linear", "ties": "ties", "dare_ties": "dare_ties"}


@dataclass(frozen=True)
class MergeConfig(NPOKLConfig):
    """Their run: adapters at (NPO, KL, CE) weights 0.4/0.4/0.2 and 0.3/0.3/0.4, TIES with
    density 0.8 and weights 1, 1."""

    weights_a: str = "0.4,0.4,0.2"
    weights_b: str = "0.3,0.3,0.4"
    combination: str = "ties"  # linear | ties | dare_ties
    density: float = 0.8

    RANGES = {"density": Range(0, 1, low_open=True)}
    CHOICES = {"combination": tuple(COMBINATIONS)}


@register
class Merge(Method):
    name = "merge"
    Config = MergeConfig
    small_target = NPOKL.small_target

    def procedure(self, run, model_dir: Path, data, out: Path, seed: int, eval_every: int,
                  eval_points: int, profile: str, mia=None, mmlu=None, split=None) -> dict:
        c = self.config
        started = time.perf_counter()
        shared = {k: v for k, v in asdict(c).items()
                  if k not in ("weights_a", "weights_b", "combination", "density")}
        shared["lora"] = True
        halves, records = {}, {}
        for name, weights in (("a", c.weights_a), ("b", c.weights_b)):
            w = [float(x) for x in weights.split(",")]
            if len(w) != 3:
                raise ValueError(f"weights_{name}={weights}: give three weights NPO,KL,CE")
            halves[name] = out.parent / f".{out.name}.adapter-{name}"
            records[name] = run("npo_kl", model_dir, data, halves[name], seed=seed,
                                eval_every=eval_every, eval_points=eval_points,
                                profile=profile, adapter_only=True, mia=mia, mmlu=mmlu,
                                split=split,
                                **{**shared, "w_npo": w[0], "w_kl": w[1], "w_ce": w[2]})
        record = {"method": self.name, "model": str(model_dir), "data": str(data), "split": split,
                  "seed": seed, "mia": records["a"]["mia"], "mmlu": records["a"]["mmlu"],
                  "model_files": records["a"]["model_files"],
                  "eval_points": eval_points, "eval_every": eval_every,
                  "profile": profile, "config": asdict(c), "status": "complete",
                  "adapters": {k: {kk: v[kk] for kk in ("config", "history", "train_seconds",
                                                        "selection")}
                               for k, v in records.items()},
                  "train_seconds": sum(r["train_seconds"] for r in records.values()),
                  **{k: sum(r[k] for r in records.values()) for k in ("steps", "steps_trained")},
                  # each adapter's run was planned and checked; they run one after the other
                  "memory_plan": records["a"]["memory_plan"],
                  "trainable_parameters": records["a"]["trainable_parameters"] * 2,
                  "peak_memory_mb": max(r["peak_memory_mb"] for r in records.values()),
                  "wall_seconds_this_run": time.perf_counter() - started,
                  "history": records["a"]["history"]}
        state = process_state()
        if state.is_main_process:  # under a launcher every process trained; one merges
            self._merge_and_save(model_dir, halves, out, record)
        state.wait_for_everyone()
        return record

    def _merge_and_save(self, model_dir: Path, halves: dict[str, Path], out: Path,
                        record: dict) -> None:
        """The two adapters combined with PEFT's ``add_weighted_adapter``, merged into the
        source model and written to ``out`` in the source's dtype; the adapters then go."""
        c = self.config
        base, tokenizer = load_model(model_dir, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, halves["a"], adapter_name="a")
        peft_model.load_adapter(halves["b"], adapter_name="b")
        extra = {} if c.combination == "linear" else {"density": c.density}
        peft_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "merged",
                                        combination_type=COMBINATIONS[c.combination], **extra)
        peft_model.set_adapter("merged")
        merged = peft_model.merge_and_unload().to(output_dtype(c, model_dir))
        with atomic_directory(out, RUN) as tmp, writing(tmp):
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "run.json", record)
        for path in halves.values():
            shutil.rmtree(path, ignore_errors=True)
