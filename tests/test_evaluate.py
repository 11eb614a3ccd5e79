import json
import statistics

import pandas as pd
import pytest

from unlearn.data import load_lume
from unlearn.evaluation.scoring import evaluate, read_rows_csv, write_rows_csv
from unlearn.measure.official import RowResult, aggregated_terms, mia_auc, mia_score, split_scores

DEGENERATE = ["", "\r", "lone\rreturn", "a\r\nb", "line\nbreak", '"quoted", comma',
              "\x1b[31mcontrol\x07", "tab\there", "nan", "NULL", "rep " * 300, " ", "0.5"]


def test_csv_round_trips_degenerate_generations(tmp_path):
    rows = [RowResult(f"d{i}sc1", "Task1", "forget", "sc", f"in{i}", "expected", text, 1.5 + i,
                      0.0, False) for i, text in enumerate(DEGENERATE)]
    write_rows_csv(tmp_path / "forget_0.csv", rows)
    back = read_rows_csv(tmp_path / "forget_0.csv")
    assert len(back) == len(rows)
    assert back["model_output"].tolist() == DEGENERATE
    assert back["task"].tolist() == ["Task1"] * len(rows)
    assert back["nll"].tolist() == [r.nll for r in rows]
    # the official scorer's plain pd.read_csv also gets every row back, in its columns
    official = pd.read_csv(tmp_path / "forget_0.csv")
    assert len(official) == len(rows) and set(official["task"]) == {"Task1"}


def test_aggregation_follows_the_official_definitions():
    def rows(split, scores):
        return [RowResult(f"x{i}{kind}0", task, split, kind, "", "", "", 0.0, s, False)
                for i, (task, kind, s) in enumerate(scores)]
    forget = rows("forget", [("Task1", "sc", 0.2), ("Task1", "qa", 1.0), ("Task1", "qa", 0.0),
                             ("Task2", "sc", 0.5), ("Task2", "qa", 0.0),
                             ("Task3", "sc", 0.1), ("Task3", "qa", 0.0)])
    retain = rows("retain", [("Task1", "sc", 0.9), ("Task1", "qa", 1.0), ("Task2", "sc", 0.8),
                             ("Task2", "qa", 1.0), ("Task3", "sc", 0.7), ("Task3", "qa", 1.0)])
    f, r = split_scores(forget), split_scores(retain)
    assert f["Task1"] == {"regurgitation-score": 0.2, "knowledge-score": 0.5}
    assert f["overall-knowledge-score"] == pytest.approx(0.25)
    names, terms = aggregated_terms(f, r)
    assert terms == pytest.approx([0.8, 0.5, 0.5, 1.0, 0.9, 1.0, 0.9, 1.0, 0.8, 1.0, 0.7, 1.0])
    assert names[0] == "forget Task1 regurgitation-score" and len(names) == 12
    retain_zero = split_scores(rows("retain", [("Task1", "sc", 0.0), ("Task1", "qa", 1.0)]))
    assert statistics.harmonic_mean(aggregated_terms(f, retain_zero)[1]) == 0


def test_a_task_without_questions_is_scored_on_the_terms_that_exist(tiny_target, synth_dir,
                                                                     tmp_path):
    """No bare NaN in results.json: the missing terms are left out and the others named."""
    data = tmp_path / "d"
    data.mkdir()
    for split in ("forget", "retain"):
        lines = (synth_dir / f"{split}.jsonl").read_text().splitlines()
        keep = [line for line in lines
                if not ('"Task1"' in line and "qa" in json.loads(line)["id"][-3:])]
        (data / f"{split}.jsonl").write_text("\n".join(keep) + "\n")
    assert load_lume(data).absent_terms() == ["forget Task1 knowledge", "retain Task1 knowledge"]
    results = evaluate(tiny_target[0], data, tmp_path / "e", max_new_tokens=4)
    saved = json.loads((tmp_path / "e" / "results.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"bare {c} in results.json"))
    assert saved["forget-set"]["Task1"]["knowledge-score"] is None
    assert len(saved["aggregated-terms"]) == 10 and not any(
        "Task1 knowledge" in name for name in saved["aggregated-term-names"])
    assert saved["harmonic-mean-task-aggregate"] == results["harmonic-mean-task-aggregate"]


def test_mia_auc_and_score():
    assert mia_auc([0.1, 0.2], [5.0, 6.0]) == 1.0  # members have lower loss: fully exposed
    assert mia_auc([5.0, 6.0], [0.1, 0.2]) == 0.0
    assert mia_score(mia_auc([1.0, 2.0], [1.0, 2.0])) == 1.0
    assert mia_score(0.75) == 0.5


def test_evaluate_writes_official_files_consistent_with_results(tiny_target, synth_dir,
                                                                tmp_path):
    out = tmp_path / "eval"
    results = evaluate(tiny_target[0], synth_dir, out, mia=synth_dir / "mia",
                       mmlu=synth_dir / "mmlu", max_new_tokens=64)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["harmonic-mean-task-aggregate"] == results["harmonic-mean-task-aggregate"]
    for key in ("forget-set", "retain-set", "aggregated-terms", "mia_loss_acc",
                "mia_final_score", "mmlu_average", "aggregate-score"):
        assert key in on_disk
    assert len(results["aggregated-terms"]) == 12
    assert results["aggregate-score"] == pytest.approx(statistics.mean(
        [results["harmonic-mean-task-aggregate"], results["mmlu_average"],
         results["mia_final_score"]]))
    forget = read_rows_csv(out / "forget_0.csv")
    assert list(forget.columns) == ["id", "task", "input", "expected_output", "model_output",
                                    "nll"]
    # the metric step recomputed from our CSV gives the same per-task knowledge
    qa = forget[forget["id"].str[:-1].str.endswith("qa")]
    exact = (qa["expected_output"].str.strip().str.lower()
             == qa["model_output"].str.strip().str.lower()).groupby(qa["task"]).mean()
    for task, value in exact.items():
        assert results["forget-set"][task]["knowledge-score"] == pytest.approx(value)
    members = pd.read_csv(out / "mia_results" / "member_0.csv")
    assert list(members.columns) == ["id", "nll"] and len(members) == 9  # the forget documents
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == len(forget) + len(read_rows_csv(out / "retain_0.csv"))
    # a memorised target: forget knowledge high, MIA exposed
    assert results["forget-set"]["Task3"]["knowledge-score"] == 1.0
    assert results["mia_loss_acc"] > 0.9
