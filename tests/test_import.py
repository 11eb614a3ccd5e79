"""`unlearn data import`: plain documents become a LUME directory every command reads."""

import json

import pytest

from unlearn.data import DataError, import_documents, load_lume, load_mia


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def documents(tmp_path):
    forget = tmp_path / "forget"
    forget.mkdir()
    (forget / "alice.txt").write_text("Alice Smith lives at 12 Elm Road.\nHer phone is "
                                      "555 123 4567 and she likes tea.\n")
    (forget / "bob.txt").write_text("Bob Jones was born in 1970 in Leeds and plays the cello.")
    retain = _write(tmp_path / "retain.jsonl", [
        {"text": "The capital of France is Paris, a city on the Seine."},
        {"id": "water", "text": "Water boils at one hundred degrees at sea level.",
         "task": "science"}])
    unseen = _write(tmp_path / "unseen.jsonl", [{"text": "A note about roses in spring."}])
    questions = _write(tmp_path / "q.jsonl", [
        {"id": "alice", "question": "What is Alice Smith's phone number?", "answer": "5551234567"},
        {"id": "alice", "question": "Where does Alice Smith live?", "answer": "12 Elm Road"},
        {"id": "water", "question": "At what temperature does water boil?", "answer": "100"}])
    return forget, retain, unseen, questions


def test_documents_become_rows_questions_and_an_mia_set(documents, tmp_path):
    forget, retain, unseen, questions = documents
    out = import_documents(forget, retain, tmp_path / "d", nonmember=unseen,
                           questions=questions, seed=0)
    lume = load_lume(out)
    ids = {r.id: r for r in lume.rows}
    assert set(ids) == {"alicesc1", "bobsc1", "aliceqa1", "aliceqa2", "retain1sc1",
                        "watersc1", "waterqa1"}
    alice = ids["alicesc1"]
    # cut before the middle word, the document's own line break kept
    assert alice.text == (forget / "alice.txt").read_text().strip()
    assert len(alice.input.split()) == len(alice.text.split()) // 2
    assert ids["aliceqa2"].output == "12 Elm Road" and ids["aliceqa2"].split == "forget"
    assert ids["watersc1"].task == ids["waterqa1"].task == "science"
    assert ids["bobsc1"].task == "custom"
    mia = load_mia(out / "mia")
    # as many members as never-seen documents, each as the model is trained on it
    assert [d.document for d in mia.nonmember] == ["A note about roses in spring."]
    assert len(mia.member) == 1
    assert mia.member[0].document in {ids["alicesc1"].text, ids["bobsc1"].text}
    assert json.loads((out / "import.json").read_text())["rows"] == {"forget": 4, "retain": 3}
    assert not (out / "never_seen").exists()  # one never-seen document states no rate


def test_never_seen_documents_keep_their_tasks_for_the_receipt(documents, tmp_path):
    forget, retain, _, _ = documents
    unseen = _write(tmp_path / "more.jsonl", [
        {"text": "A note about roses in spring."},
        {"text": "Ice melts at zero degrees.", "task": "science"},
        {"text": "Carol Diaz plays chess in Porto."}])
    out = import_documents(forget, retain, tmp_path / "d", nonmember=unseen)
    held = load_lume(out / "never_seen")
    assert sorted((r.task, r.text) for r in held.rows) == [
        ("custom", "A note about roses in spring."), ("custom", "Carol Diaz plays chess in Porto."),
        ("science", "Ice melts at zero degrees.")]
    assert [d.document for d in load_mia(out / "mia").nonmember] == [
        "A note about roses in spring.", "Ice melts at zero degrees.",
        "Carol Diaz plays chess in Porto."]


def test_bad_documents_are_refused_with_file_and_line_and_nothing_written(documents,
                                                                         tmp_path):
    forget, retain, unseen, questions = documents
    twice = _write(tmp_path / "twice.jsonl", [{"id": "alice", "text": "Someone else entirely."},
                                              {"text": "one"}, {"body": "no text"}])
    with pytest.raises(DataError) as e:
        import_documents(forget, twice, tmp_path / "d")
    assert f"{twice}:3: expected a JSON object with a string 'text' field" in str(e.value)
    with pytest.raises(DataError) as e:
        import_documents(forget, _write(tmp_path / "r2.jsonl", [
            {"id": "alice", "text": "Someone else entirely."}, {"text": "one"}]), tmp_path / "d")
    assert "id 'alice' is used again" in str(e.value)
    assert "at least two words" in str(e.value)
    same = _write(tmp_path / "same.jsonl", [{"text": (forget / "bob.txt").read_text()}])
    with pytest.raises(DataError, match="is a forget document"):
        import_documents(forget, retain, tmp_path / "d", nonmember=same)
    stray = _write(tmp_path / "stray.jsonl", [{"id": "carol", "question": "Q?", "answer": "A"}])
    with pytest.raises(DataError, match=f"{stray}:1: no forget or retain document has id"):
        import_documents(forget, retain, tmp_path / "d", questions=stray)
    with pytest.raises(DataError, match="neither a .jsonl file nor a folder"):
        import_documents(tmp_path / "nowhere.csv", retain, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_split_without_a_task_the_other_has_is_scored_and_drawn(documents, tmp_path,
                                                                  tiny_target):
    """retain has a `science` task that forget lacks: eval scores the terms that exist and
    still writes its report."""
    from unlearn.evaluation.scoring import evaluate
    forget, retain, unseen, questions = documents
    data = import_documents(forget, retain, tmp_path / "d", questions=questions)
    results = evaluate(tiny_target[0], data, tmp_path / "e", max_new_tokens=8)
    assert "science" in results["retain-set"] and "science" not in results["forget-set"]
    assert "retain science knowledge-score" in results["aggregated-term-names"]
    assert (tmp_path / "e" / "report.html").stat().st_size > 0
