"""README promises not exercised elsewhere: the bench and demo command lines, the locate command,
a task without sentence-completion rows, a corpus that is not UTF-8."""

import importlib
import json
import math
from pathlib import Path

import pytest

from unlearn import leaderboard
from unlearn.cli import main
from unlearn.data import DataError, load_lume
from unlearn.data.corpus import load_corpus
from unlearn.measure.official import aggregated_terms, score_generations, split_scores

demo_module = importlib.import_module("unlearn.demo")  # the package exports its function


def _recording_bench(monkeypatch, module):
    """Replace ``bench`` where ``module`` reads it with one that records its arguments and
    returns an empty leaderboard, writing the files the commands print."""
    calls = []

    def bench(data, out, **kw):
        calls.append({"data": data, "out": out, **kw})
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "leaderboard.md").write_text("| model |\n")
        return {"rows": [], "damaged": []}
    monkeypatch.setattr(module, "bench", bench)
    return calls


def test_bench_command_line_reaches_bench_whole(monkeypatch, tmp_path, synth_dir):
    calls = _recording_bench(monkeypatch, leaderboard)
    code = main(["bench", "--data", str(synth_dir), "--out", str(tmp_path / "b"),
                 "--methods", "sugd,fast:gd", "--seeds", "3", "--no-receipts", "--mia", "none",
                 "fast.lr=1e-3", "sugd.chunk_size=16", "target.pretrain_tokens=9000"])
    assert code == 0
    [call] = calls
    assert call["methods"] == ["sugd", "fast:gd"] and call["seeds"] == 3
    assert call["receipts"] is False and call["mia"] is None
    assert call["settings"] == {"fast": {"lr": "1e-3"}, "sugd": {"chunk_size": "16"}}
    assert call["target_settings"] == {"pretrain_tokens": "9000"}
    assert main(["bench", "--data", str(synth_dir), "--out", str(tmp_path / "c"),
                 "lr=1e-3"]) == 2  # a setting that names no method
    assert len(calls) == 1


def test_settings_by_label_groups_each_label_and_refuses_one_without():
    assert leaderboard.settings_by_label(["a.lr=1", "a.epochs=2", "target.x=y"]) == {
        "a": {"lr": "1", "epochs": "2"}, "target": {"x": "y"}}
    with pytest.raises(ValueError, match="name the method"):
        leaderboard.settings_by_label(["lr=5e-4"])


def test_demo_synthesises_its_data_once_and_benches_the_seed_systems(monkeypatch, tmp_path):
    calls = _recording_bench(monkeypatch, demo_module)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    [call] = calls
    assert call["methods"] == demo_module.DEMO_METHODS == ("sugd", "sha256")
    assert call["target_settings"] == demo_module.DEMO_TARGET["small"]
    data = load_lume(out / "data")
    per_task = {t: len({r.doc_id for r in data.rows if r.task == t}) for t in ("Task1", "Task3")}
    assert per_task == dict.fromkeys(("Task1", "Task3"), demo_module.DEMO_DOCS_PER_TASK)
    stamp = (out / "data" / "synth.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(out)]) == 0  # a second run reuses the data
    assert (out / "data" / "synth.json").stat().st_mtime_ns == stamp and len(calls) == 2


def test_locate_command_traces_with_the_window_given(tiny_target, synth_dir, tmp_path, capsys):
    from unlearn.tracing import locate
    args = ["--model", str(tiny_target[0]), "--data", str(synth_dir), "--samples", "2",
            "--max-facts", "3"]
    assert main(["locate", *args, "--out", str(tmp_path / "w2"), "--window", "2"]) == 0
    assert "layers chosen" in capsys.readouterr().out
    wide = json.loads((tmp_path / "w2" / "trace.json").read_text())
    assert wide["window"] == 2 and {p.name for p in (tmp_path / "w2").glob("*.png")}
    narrow = locate(tiny_target[0], synth_dir, tmp_path / "w1", samples=2, max_facts=3, window=1)
    # the window is how many layers' MLP outputs are restored together: residual effects,
    # restored one layer at a time, do not depend on it
    assert narrow["indirect_effect"]["mlp"] != wide["indirect_effect"]["mlp"]
    assert narrow["indirect_effect"]["residual"] == wide["indirect_effect"]["residual"]


def test_a_task_without_sentence_completions_is_scored_on_the_terms_it_has(synth_dir):
    rows = [r for r in load_lume(synth_dir).rows if not (r.task == "Task1" and r.kind == "sc")]
    scored = score_generations(rows, [r.output for r in rows], [1.0] * len(rows),
                               [False] * len(rows))
    forget = split_scores([r for r in scored if r.split == "forget"])
    retain = split_scores([r for r in scored if r.split == "retain"])
    assert forget["Task1"]["regurgitation-score"] is None
    names, terms = aggregated_terms(forget, retain)
    assert len(terms) == 10 and "forget Task1 regurgitation-score" not in names
    assert "NaN" not in json.dumps(forget) and not any(math.isnan(t) for t in terms)


def test_a_corpus_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    (tmp_path / "good.txt").write_text("plain text\n", encoding="utf-8")
    (tmp_path / "old.txt").write_bytes("first line\nsecond caf\xe9 line\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"old\.txt:2: not UTF-8 text"):
        load_corpus(tmp_path)
