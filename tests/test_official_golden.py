"""The scorer against the organisers' own numbers: generations, losses and MMLU prompts scored
once by their ``evaluate_generations.py`` and MMLU harness (``tools/official_golden.py`` holds
the command and the pinned commit), stored in ``tests/data/official``, and checked here term by
term."""

import csv
import json
from pathlib import Path

import pytest

from unlearn.data.lume import Row, row_kind
from unlearn.data.mmlu import Question
from unlearn.measure.official import (
    aggregated_terms,
    final_scores,
    mia_auc,
    score_generations,
    split_scores,
    task_aggregate,
)

GOLDEN = Path(__file__).parent / "data" / "official"
EXACT = dict(rel=1e-12, abs=1e-12)


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _scored(split: str):
    records = _read(GOLDEN / f"{split}_0.csv")
    rows = [Row(r["id"], r["input"], r["expected_output"], r["task"], split, *row_kind(r["id"]))
            for r in records]
    return score_generations(rows, [r["model_output"] for r in records],
                             [float(r["nll"]) for r in records], [False] * len(rows))


def _project_results() -> dict:
    results = {f"{split}-set": split_scores(_scored(split)) for split in ("forget", "retain")}
    member, nonmember = ([float(r["nll"]) for r in _read(GOLDEN / "mia_results" / f"{n}_0.csv")]
                         for n in ("member", "nonmember"))
    results["mia_loss_acc"] = mia_auc(member, nonmember)
    results["mmlu_average"] = json.loads((GOLDEN / "mmlu_metrics.json").read_text())[
        "average_acc"]
    _, terms = aggregated_terms(results["forget-set"], results["retain-set"])
    results["aggregated-terms"] = terms
    results["harmonic-mean-task-aggregate"] = task_aggregate(terms)
    results.update(final_scores(results))
    return results


def test_every_official_number_is_the_organisers_scripts():
    official = json.loads((GOLDEN / "results.json").read_text())
    ours = _project_results()
    for split in ("forget-set", "retain-set"):
        assert ours[split].keys() == official[split].keys()
        for key, value in official[split].items():
            if isinstance(value, dict):
                for score, v in value.items():
                    assert ours[split][key][score] == pytest.approx(v, **EXACT), (split, key)
            else:
                assert ours[split][key] == pytest.approx(value, **EXACT), (split, key)
    assert ours["aggregated-terms"] == pytest.approx(official["aggregated-terms"], **EXACT)
    for key in ("harmonic-mean-task-aggregate", "mia_loss_acc", "mia_final_score",
                "mmlu_average", "aggregate-score"):
        assert ours[key] == pytest.approx(official[key], **EXACT), key
    # the golden rows are chosen so near misses differ: these are not all 0 or 1
    assert 0 < official["harmonic-mean-task-aggregate"] < 1
    assert 0 < official["mia_final_score"] < 1


def test_mmlu_prompts_are_the_harness_prompts_for_every_number_of_shots():
    golden = json.loads((GOLDEN / "mmlu_prompts.json").read_text())

    def question(record, shots=()):
        return Question(golden["subject"], record[0], tuple(record[1:5]), record[5], shots)

    dev = tuple(question(r) for r in golden["dev"])
    for shots, prompts in golden["prompts"].items():
        for record, prompt in zip(golden["test"], prompts, strict=True):
            assert question(record, dev).prompt_with(int(shots)) == prompt
