import json
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unlearn.data import DataError, load_corpus, load_lume, load_mia, load_mmlu


def write_jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def rows(split, docs, task="Task1"):
    out = []
    for d in docs:
        out.append({"id": f"{d}sc1", "input": f"Start of {d}.", "output": f"End of {d}.",
                    "task": task, "split": split})
        out.append({"id": f"{d}qa0", "input": f"Who is {d}?", "output": d, "task": task,
                    "split": split})
    return out


@pytest.fixture
def lume_dir(tmp_path):
    write_jsonl(tmp_path / "forget.jsonl", rows("forget", ["alpha", '"q-1"']))
    write_jsonl(tmp_path / "retain.jsonl", rows("retain", ["beta", "gamma"], task="Task2"))
    return tmp_path


def test_loads_rows_kinds_and_documents(lume_dir):
    data = load_lume(lume_dir)
    assert [r.id for r in data.forget] == ["alphasc1", "alphaqa0", '"q-1"sc1', '"q-1"qa0']
    quoted = data.forget[2]
    assert (quoted.kind, quoted.doc_id, quoted.split) == ("sc", '"q-1"', "forget")
    assert quoted.text == 'Start of "q-1". End of "q-1".'
    assert data.summary()["retain"] == {"Task2/qa": 2, "Task2/sc": 2}


def test_parquet_form_loads_the_same(lume_dir, tmp_path_factory):
    pq_dir = tmp_path_factory.mktemp("pq")
    for split in ("forget", "retain"):
        pd.read_json(lume_dir / f"{split}.jsonl", lines=True).to_parquet(
            pq_dir / f"{split}_validation-00000-of-00001.parquet")
    assert load_lume(pq_dir) == load_lume(lume_dir)


def test_the_official_snapshot_folder_holds_both_splits_and_split_chooses(lume_dir, synth_dir,
                                                                          tmp_path):
    # as published: forget_train-*, forget_validation-*, retain_train-*, ... in one folder
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for split, source in (("train", synth_dir), ("validation", lume_dir)):
        for name in ("forget", "retain"):
            pd.read_json(source / f"{name}.jsonl", lines=True).to_parquet(
                snapshot / f"{name}_{split}-00000-of-00001.parquet")
    assert load_lume(snapshot, split="validation") == load_lume(lume_dir)
    assert load_lume(snapshot, split="train") == load_lume(synth_dir)
    message = error_of(snapshot)
    assert "holds the splits train, validation" in message and "--split" in message
    assert message.count("holds the splits") == 1  # said once, not once per set


def error_of(directory) -> str:
    with pytest.raises(DataError) as e:
        load_lume(directory)
    return str(e.value)


def test_missing_file_names_directory(tmp_path):
    write_jsonl(tmp_path / "forget.jsonl", rows("forget", ["a"]))
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "retain" in message


def test_two_candidate_files_is_an_error(lume_dir):
    pd.read_json(lume_dir / "forget.jsonl", lines=True).to_parquet(lume_dir / "forget.parquet")
    assert "several files" in error_of(lume_dir)


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r.pop("output"), "missing column(s) output"),
    (lambda r: r.update(id="alpha_x1"), "neither scN nor qaN"),
    (lambda r: r.update(task="Task 9"), "task 'Task 9' is not a label"),
    (lambda r: r.update(task="overall-knowledge-score"), "is not a label"),
    (lambda r: r.update(input=3), "column 'input' must be a string"),
    (lambda r: r.update(split="retain"), "sits in the forget file"),
])
def test_bad_row_names_file_and_line(lume_dir, mutate, expected):
    records = rows("forget", ["alpha", "delta"])
    mutate(records[2])
    write_jsonl(lume_dir / "forget.jsonl", records)
    message = error_of(lume_dir)
    assert "forget.jsonl:3: " in message and expected in message


def test_duplicate_id_names_both_lines(lume_dir):
    records = rows("forget", ["alpha"])
    write_jsonl(lume_dir / "forget.jsonl", records + [records[0]])
    message = error_of(lume_dir)
    assert "forget.jsonl:3: duplicate id 'alphasc1' (first on line 1)" in message


def test_invalid_json_line(lume_dir):
    (lume_dir / "forget.jsonl").write_text(json.dumps(rows("forget", ["a"])[0]) + "\n{oops\n")
    assert "forget.jsonl:2: not valid JSON" in error_of(lume_dir)


def test_empty_set(lume_dir):
    (lume_dir / "retain.jsonl").write_text("")
    assert "the retain set must not be empty" in error_of(lume_dir)


def test_document_in_both_forget_and_retain(lume_dir):
    write_jsonl(lume_dir / "retain.jsonl", rows("retain", ["beta"]) +
                [dict(rows("retain", ["alpha"])[1])])
    message = error_of(lume_dir)
    assert "alphasc1" in message and "must share no document" in message


def test_every_problem_reported_at_once(lume_dir):
    records = rows("forget", ["alpha", "delta"])
    records[0]["task"] = "Task 7"
    records[3].pop("input")
    write_jsonl(lume_dir / "forget.jsonl", records)
    problems = error_of(lume_dir).splitlines()
    assert len(problems) == 2 and ":1:" in problems[0] and ":4:" in problems[1]


def test_mia_sets(tmp_path):
    write_jsonl(tmp_path / "member.jsonl", [{"id": "m1", "document": "A text."}])
    write_jsonl(tmp_path / "nonmember.jsonl", [{"id": "n1", "document": "B."},
                                               {"id": "n1", "document": "C."}])
    with pytest.raises(DataError, match=r"nonmember.jsonl:2: duplicate id 'n1'"):
        load_mia(tmp_path)
    write_jsonl(tmp_path / "nonmember.jsonl", [{"id": "n1", "document": "B.", "extra": 1}])
    mia = load_mia(tmp_path)
    assert [d.document for d in mia.member + mia.nonmember] == ["A text.", "B."]


def test_mmlu_csv_with_and_without_header(tmp_path):
    (tmp_path / "x_test.csv").write_text("question,A,B,C,D,answer\nWhat?,a,b,c,d,C\n")
    (tmp_path / "y_test.csv").write_text('"Why, then?",1,2,3,4,A\n')
    questions = load_mmlu(tmp_path)
    assert [(q.subject, q.answer) for q in questions] == [("x", "C"), ("y", "A")]
    assert questions[1].prompt.endswith("Why, then?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    (tmp_path / "z_test.csv").write_text("Q,1,2,3,4,E\n")
    with pytest.raises(DataError, match="z_test.csv:1: answer 'E'"):
        load_mmlu(tmp_path)


def test_corpus_forms(tmp_path, lume_dir):
    assert load_corpus(lume_dir)[0] == "Start of alpha. End of alpha."
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"document": "one"}, {"text": "two"}])
    (corpus / "b.txt").write_text("three")
    assert load_corpus(corpus) == ["one", "two", "three"]


# Property tests: any valid set loads intact; any single corruption is caught at its line.
doc_names = st.lists(st.text("abcdefghij0123456789-", min_size=1, max_size=12), min_size=1,
                     max_size=6, unique=True)
corruptions = st.sampled_from(["drop_id", "drop_task", "int_output", "bad_suffix", "bad_task",
                               "duplicate", "list_input"])


def corrupt(record: dict, how: str, other: dict) -> dict:
    record = dict(record)
    if how == "drop_id":
        record.pop("id")
    elif how == "drop_task":
        record.pop("task")
    elif how == "int_output":
        record["output"] = 7
    elif how == "list_input":
        record["input"] = ["x"]
    elif how == "bad_suffix":
        record["id"] = record["id"][:-3] + "xx1"
    elif how == "bad_task":
        record["task"] = "task 1"  # a label is one word
    elif how == "duplicate":
        record = dict(other)
    return record


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=doc_names, how=corruptions, pick=st.integers(min_value=1))
def test_property_single_corruption_reported_at_its_line(tmp_path, names, how, pick):
    forget = rows("forget", [f"f{n}" for n in names])
    write_jsonl(tmp_path / "retain.jsonl", rows("retain", ["r0"]))
    write_jsonl(tmp_path / "forget.jsonl", forget)
    assert [r.id for r in load_lume(tmp_path).forget] == [r["id"] for r in forget]
    # a duplicate is reported where it repeats an earlier row, so it never sits on line 1
    line = 2 + pick % (len(forget) - 1) if how == "duplicate" else 1 + pick % len(forget)
    forget[line - 1] = corrupt(forget[line - 1], how, forget[0])
    write_jsonl(tmp_path / "forget.jsonl", forget)
    with pytest.raises(DataError) as e:
        load_lume(tmp_path)
    assert f"forget.jsonl:{line}:" in str(e.value)


def test_mia_split_holds_out_a_seeded_share_and_saves_the_rest(synth_dir, tmp_path):
    mia = load_mia(synth_dir / "mia")
    held, rest = mia.split(0.3, seed=1)
    for part_held, part_rest, whole in ((held.member, rest.member, mia.member),
                                        (held.nonmember, rest.nonmember, mia.nonmember)):
        assert {d.id for d in part_held}.isdisjoint(d.id for d in part_rest)
        assert sorted(d.id for d in part_held + part_rest) == sorted(d.id for d in whole)
        assert len(part_held) == max(2, round(0.3 * len(whole)))
    assert mia.split(0.3, seed=1) == (held, rest) and mia.split(0.3, seed=2) != (held, rest)
    assert load_mia(rest.save(tmp_path / "rest")) == rest


def test_mia_split_spreads_the_held_out_share_over_the_strata(synth_dir):
    mia = load_mia(synth_dir / "mia")
    # members of three kinds, non-members ranked: the held-out share takes from every kind
    # in proportion, and one non-member from each stretch of the ranking
    member_keys = [i % 3 for i in range(len(mia.member))]
    nonmember_keys = list(range(len(mia.nonmember)))
    for seed in range(5):
        held, _ = mia.split(0.3, seed, (member_keys, nonmember_keys))
        kinds = [member_keys[mia.member.index(d)] for d in held.member]
        counts = [kinds.count(k) for k in range(3)]
        assert len(kinds) >= 3 and max(counts) - min(counts) <= 1 and min(counts) >= 1
        ranks = sorted(mia.nonmember.index(d) for d in held.nonmember)
        stretch = int(len(mia.nonmember) / len(ranks))  # evenly spaced along the ranking
        assert all(stretch <= b - a <= stretch + 1 for a, b in zip(ranks, ranks[1:]))


def test_a_byte_order_mark_is_read_and_bad_bytes_are_named_by_line(lume_dir, tmp_path):
    forget = lume_dir / "forget.jsonl"
    forget.write_bytes(b"\xef\xbb\xbf" + forget.read_bytes())
    assert [r.id for r in load_lume(lume_dir).forget][0] == "alphasc1"
    lines = forget.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Start", b"St\xffart")
    forget.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"forget.jsonl:3: not UTF-8 text \(byte \d+\); save"):
        load_lume(lume_dir)
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "q.csv").write_bytes(b"q,a,b,c,d,A\nq2,\xe9,b,c,d,B\n")
    with pytest.raises(DataError, match=r"q.csv:2: not UTF-8 text"):
        load_mmlu(tmp_path / "mmlu")
