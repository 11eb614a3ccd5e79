"""Choosing the model a run keeps: the estimate, its agreement with the evaluator, patience,
the other rules, and the run.json record."""

import math

import pytest
import torch

from unlearn.data import load_lume, load_mia
from unlearn.engine import run
from unlearn.measure.official import score_model
from unlearn.methods.base import UnlearnConfig
from unlearn.models import load_model
from unlearn.selection import ScoreRule, calibration_split, sample_rows

HOT = dict(lr=3e-3, batch_size=4)


def _rule(settings, tokenizer, lume, mia_dir, tmp_path, source, seed=0):
    """The score rule a run from ``source`` (a model) with ``seed`` makes."""
    calibration, _ = calibration_split(load_mia(mia_dir), settings.select_split, seed, lume,
                                       source, tokenizer)
    return ScoreRule(settings, tokenizer, lume, calibration, None, tmp_path, seed, writes=False)


def test_estimate_on_every_row_at_full_length_is_the_official_task_aggregate(tiny_target,
                                                                               synth_dir, tmp_path):
    model, tokenizer = load_model(tiny_target[0])
    lume = load_lume(synth_dir)
    settings = UnlearnConfig(select_rows=0, select_sc_tokens=256)
    rule = _rule(settings, tokenizer, lume, synth_dir / "mia", tmp_path, model)
    with torch.no_grad():
        official = score_model(model, tokenizer, lume).results
        estimate = rule._estimate(model)
    assert estimate["task_aggregate"] == pytest.approx(official["harmonic-mean-task-aggregate"])
    assert len(rule.rows) == len(lume.rows)
    # the MIA term is the official AUC on the calibration documents
    assert estimate["mia_score"] == pytest.approx(1 - 2 * abs(estimate["mia_auc"] - 0.5))
    assert estimate["estimate"] == pytest.approx(
        (estimate["task_aggregate"] + estimate["mia_score"] + estimate["utility"]) / 3)


def test_row_sample_is_seeded_and_stratified(synth_dir):
    lume = load_lume(synth_dir)
    a, b = sample_rows(lume, 2, seed=0), sample_rows(lume, 2, seed=0)
    assert a == b and sample_rows(lume, 2, seed=1) != a
    cells = {(r.split, r.task, r.kind) for r in lume.rows}
    assert {(r.split, r.task, r.kind) for r in a} == cells
    assert all(sum((r.split, r.task, r.kind) == c for r in a) <= 2 for c in cells)


def _expected_rank(check: dict) -> float:
    """How the rule should rank a recorded check: the estimate times u, flagged models last."""
    return check["estimate"] * check["general_utility"] - 2 * check["damaged"]


def _scripted_rule(estimates, tiny_target, synth_dir, tmp_path, monkeypatch, damaged=(),
                   utilities=None):
    """A score rule (patience 2) whose estimates are ``estimates``, check after check, general
    text flagged at the checks numbered in ``damaged`` and read at u ``utilities[i]`` (else
    1); and the stop answer of each check, at steps 0, 2, 4, ..."""
    model, tokenizer = load_model(tiny_target[0])
    rule = ScoreRule(UnlearnConfig(select_patience=2), tokenizer, load_lume(synth_dir),
                     load_mia(synth_dir / "mia"), None, tmp_path, 0, writes=True)
    values = iter(enumerate(estimates))

    def scripted(model):
        i, value = next(values)
        rule.last = {"estimate": value, "damaged": i in damaged,
                     "general_utility": (utilities or {}).get(i, 1.0)}
        return rule.last
    monkeypatch.setattr(rule, "_estimate", scripted)
    return rule, [rule.check(model, 2 * i) for i in range(len(estimates))]


def test_the_model_a_run_started_from_is_never_kept(tiny_target, synth_dir, tmp_path,
                                                     monkeypatch):
    # every step scores worse than the start: the best later model is kept all the same, and
    # patience never runs out, since no model has yet beaten the start
    rule, stops = _scripted_rule([0.5, 0.2, 0.3, 0.1, 0.25, 0.2], tiny_target, synth_dir,
                                 tmp_path, monkeypatch)
    assert rule.keeper.best()["step"] == 4
    assert not any(stops)


def test_patience_counts_from_the_first_model_that_beats_the_start(tiny_target, synth_dir,
                                                                   tmp_path, monkeypatch):
    rule, stops = _scripted_rule([0.5, 0.2, 0.3, 0.6, 0.4, 0.55], tiny_target, synth_dir,
                                 tmp_path, monkeypatch)
    assert rule.keeper.best()["step"] == 6
    assert stops == [False] * 5 + [True]


def test_a_flagged_model_is_never_kept_over_an_unflagged_one(tiny_target, synth_dir, tmp_path,
                                                           monkeypatch):
    # checks 3 and 4 estimate best, but damage general text: check 2, the best unflagged, is kept
    rule, stops = _scripted_rule([0.3, 0.4, 0.5, 0.9, 0.8], tiny_target, synth_dir,
                                 tmp_path, monkeypatch, damaged={3, 4})
    assert rule.keeper.best()["step"] == 4
    assert stops == [False] * 4 + [True]  # patience ran from check 2: flagged ones bring nothing
    # when every later model is flagged, the best of them is kept (the source never is)
    (tmp_path / "all").mkdir()
    rule, _ = _scripted_rule([0.3, 0.9, 0.8], tiny_target, synth_dir, tmp_path / "all",
                             monkeypatch, damaged={1, 2})
    assert rule.keeper.best()["step"] == 2


def test_models_rank_by_the_estimate_times_general_utility(tiny_target, synth_dir, tmp_path,
                                                           monkeypatch):
    # check 2 estimates higher, but at u 0.8 (not flagged) it ranks 0.44 against check 1's 0.5
    rule, _ = _scripted_rule([0.3, 0.5, 0.55], tiny_target, synth_dir, tmp_path, monkeypatch,
                             utilities={2: 0.8})
    assert rule.keeper.best()["step"] == 2


def test_run_keeps_the_best_ranked_model(tiny_target, synth_dir, tmp_path):
    # fp32: the kept check's terms are estimated again below outside the run's autocast
    record = run("ga", tiny_target[0], synth_dir, tmp_path / "u", epochs=4,
                 select_every=2, select_patience=0, precision="fp32", **HOT)
    selection = record["selection"]
    trail = selection["trail"]
    assert selection["rule"] == "score" and selection["utility"] == "mmlu"  # DATA/mmlu found
    steps = [t["step"] for t in trail]
    assert steps[0] == 0 and steps[-1] == record["steps"] == record["steps_trained"]
    assert all(b - a == 2 for a, b in zip(steps[:-1], steps[1:-1]))
    ranks = {t["step"]: _expected_rank(t) for t in trail[1:]}
    best = max(ranks.values())
    assert selection["kept_step"] == [step for step, r in ranks.items() if r == best][-1]
    assert selection["seconds"] == pytest.approx(sum(t["seconds"] for t in trail))
    # the model saved is the one kept: estimated again, it gives the kept check's terms
    model, tokenizer = load_model(tmp_path / "u")
    settings = UnlearnConfig()
    rule = _rule(settings, tokenizer, load_lume(synth_dir), synth_dir / "mia", tmp_path,
                 load_model(tiny_target[0])[0])
    assert rule.describe()["calibration_ids"] == selection["calibration_ids"]
    kept = next(t for t in trail if t["step"] == selection["kept_step"])
    with torch.no_grad():
        again = rule._estimate(model)
    assert again["task_aggregate"] == pytest.approx(kept["task_aggregate"], abs=1e-6)
    assert again["mia_auc"] == pytest.approx(kept["mia_auc"], abs=1e-6)


def test_patience_stops_once_no_check_has_improved_for_that_many(tiny_target, synth_dir,
                                                                 tmp_path):
    record = run("ga", tiny_target[0], synth_dir, tmp_path / "u", epochs=8,
                 select_every=1, select_patience=2, lr=1e-2, batch_size=4)
    trail = record["selection"]["trail"]
    assert record["selection"]["utility"] == "mmlu"
    # general text is judged beside the estimate, against the model the run started from
    assert trail[0]["general_utility"] == 1.0 and trail[0]["damaged"] is False
    assert all(t["general_utility"] == pytest.approx(min(1.0, math.exp(
        trail[0]["never_seen_nll"] - t["never_seen_nll"]))) for t in trail)
    assert all(t["damaged"] == (t["general_utility"] < 0.75) for t in trail)
    ranks = [_expected_rank(t) for t in trail[1:]]  # the source is never kept
    best = 1 + max(range(len(ranks)), key=lambda i: (ranks[i], i))
    assert record["steps_trained"] < record["steps"]  # ascent at 1e-2 ruins it long before
    assert len(trail) - 1 - best == 2
    assert record["steps_trained"] == trail[-1]["step"]
    assert record["selection"]["kept_step"] == trail[best]["step"]


def test_without_mmlu_the_estimate_counts_general_text_as_the_utility_term(
        tiny_target, synth_dir, tmp_path):
    record = run("ga", tiny_target[0], synth_dir, tmp_path / "u", epochs=1, mmlu=None,
                 select_every=2, lr=3e-3, batch_size=4)
    trail = record["selection"]["trail"]
    assert record["selection"]["utility"] == "never-seen-nll"
    assert trail[0]["utility"] == 1.0  # the model it started from is its own reference
    assert all(t["utility"] == t["general_utility"] for t in trail)


def test_selection_is_off_without_an_mia_set_and_refused_when_asked_for(tiny_target, synth_dir,
                                                                       tmp_path):
    record = run("ga", tiny_target[0], synth_dir, tmp_path / "u", epochs=1, mia=None, **HOT)
    assert record["selection"] is None and record["mia"] is None
    with pytest.raises(ValueError, match="select=score calibrates on an MIA set"):
        run("ga", tiny_target[0], synth_dir, tmp_path / "v", mia=None, select="score")
    record = run("ga", tiny_target[0], synth_dir, tmp_path / "w", epochs=1, select="none", **HOT)
    assert record["selection"] is None and record["mia"] == str(synth_dir / "mia")


def test_knowledge_rule_stops_once_no_forget_question_is_answered(tiny_target, synth_dir,
                                                                  tmp_path):
    record = run("ga", tiny_target[0], synth_dir, tmp_path / "u", epochs=20, select="knowledge",
                 select_every=2, **HOT)
    trail = record["selection"]["trail"]
    assert trail[-1]["forget_knowledge"] == 0.0
    assert all(t["forget_knowledge"] > 0 for t in trail[:-1])
    assert record["steps_trained"] == trail[-1]["step"] < record["steps"]
    # a threshold stops at the first check at or under it
    threshold = trail[len(trail) // 2]["forget_knowledge"]
    first = next(i for i, t in enumerate(trail) if t["forget_knowledge"] <= threshold)
    again = run("ga", tiny_target[0], synth_dir, tmp_path / "t", epochs=20, select="knowledge",
                select_every=2, select_knowledge=threshold, **HOT)["selection"]["trail"]
    assert [t["forget_knowledge"] for t in again] == [t["forget_knowledge"]
                                                      for t in trail[:first + 1]]
    with pytest.raises(ValueError, match="select_knowledge=1"):
        run("ga", tiny_target[0], synth_dir, tmp_path / "x", select="knowledge",
            select_knowledge=1)


def test_mia_rule_keeps_the_model_closest_to_auc_half(tiny_target, synth_dir, tmp_path):
    record = run("ga", tiny_target[0], synth_dir, tmp_path / "u", epochs=6, select="mia",
                 select_split=1.0, select_every=2, **HOT)
    selection = record["selection"]
    trail = selection["trail"]
    distance = min(abs(t["mia_auc"] - 0.5) for t in trail)
    closest = [t for t in trail if abs(t["mia_auc"] - 0.5) == distance][-1]  # ties: the later
    assert selection["kept_step"] == closest["step"]
    full = load_mia(synth_dir / "mia")
    assert len(selection["calibration_ids"]) == len(full.member) + len(full.nonmember)


def test_a_chunked_method_is_checked_in_its_last_chunk_only(tiny_target, synth_dir, tmp_path):
    record = run("sugd", tiny_target[0], synth_dir, tmp_path / "u", chunk_size=8, epochs=3,
                 positive_ratio=1, select_every=1, select_patience=1, lr=1e-2)
    chunks = -(-len(load_lume(synth_dir).forget) // 8)
    assert max(e["stage"] for e in record["history"]) == chunks - 1  # every chunk was trained
    # a model from an earlier chunk still holds the later chunks' documents: after the
    # reference check before the first step, every check falls in the last chunk
    last_chunk = record["steps"] // chunks * (chunks - 1)  # chunks of equal length here
    steps = [t["step"] for t in record["selection"]["trail"]]
    assert steps[0] == 0 and len(steps) > 2 and all(s > last_chunk for s in steps[1:])
