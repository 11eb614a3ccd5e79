import filecmp
import json
import re

from unlearn.data import load_corpus, load_lume, load_mia, load_mmlu, synthesize


def test_same_seed_same_files_other_seed_other_data(tmp_path):
    a = synthesize(tmp_path / "a", seed=3, docs_per_task=6)
    b = synthesize(tmp_path / "b", seed=3, docs_per_task=6)
    c = synthesize(tmp_path / "c", seed=4, docs_per_task=6)
    files = ["forget.jsonl", "retain.jsonl", "mia/member.jsonl", "mia/nonmember.jsonl",
             "mmlu/general_knowledge_test.csv", "pretrain/corpus.jsonl"]
    assert filecmp.cmpfiles(a, b, files, shallow=False)[0] == files
    assert (a / "forget.jsonl").read_text() != (c / "forget.jsonl").read_text()


def test_lume_shape(synth_dir):
    data = load_lume(synth_dir)  # validates schema, ids and the forget/retain split
    for split in ("forget", "retain"):
        assert data.summary()[split] == {"Task1/qa": 3, "Task1/sc": 3, "Task2/qa": 15,
                                         "Task2/sc": 3, "Task3/qa": 3, "Task3/sc": 3}
    assert all(r.doc_id.startswith('"') for r in data.rows if r.task == "Task1")  # LUME quirk


def test_pii_is_unique_and_normalised(tmp_path):
    data = load_lume(synthesize(tmp_path / "d", seed=0, docs_per_task=60))
    qa = [r for r in data.rows if r.task == "Task2" and r.kind == "qa"]
    by_kind = {n: [r.output for r in qa if r.id.endswith(f"qa{n}")] for n in range(5)}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d", v) for v in by_kind[0])
    assert all(re.fullmatch(r"\d{9}", v) for v in by_kind[1])
    assert all(re.fullmatch(r"\d{10}", v) for v in by_kind[2])
    for n in (1, 2, 3):  # SSN, phone, email: no two people share one
        assert len(set(by_kind[n])) == len(by_kind[n]) == 60
    sc = {r.doc_id: r.text for r in data.rows if r.task == "Task2" and r.kind == "sc"}
    for r in qa:  # SSN, phone, email and address are stated in the biography (dashed there)
        if not r.id.endswith("qa0"):
            assert r.output in sc[r.doc_id] or r.output in sc[r.doc_id].replace("-", "")


def test_mia_members_are_the_forget_documents_nonmembers_never_trained(synth_dir):
    data, mia = load_lume(synth_dir), load_mia(synth_dir / "mia")
    forget_docs = {r.text for r in data.forget if r.kind == "sc"}
    assert {d.document for d in mia.member} == forget_docs
    assert len(mia.nonmember) == 3 * 6  # docs_per_task never-seen documents of each style
    trained = "\n".join([r.text for r in data.rows] + load_corpus(synth_dir / "pretrain"))
    for d in mia.nonmember:
        assert d.document not in trained
        assert d.document.split("\n")[0] not in trained  # not even the person's name


def test_pretrain_corpus_holds_no_scored_document_and_states_the_facts(synth_dir):
    corpus = set(load_corpus(synth_dir / "pretrain"))
    assert not corpus & {r.text for r in load_lume(synth_dir).rows}
    questions = load_mmlu(synth_dir / "mmlu")
    assert len(questions) == 8
    for q in questions:
        answer = q.choices["ABCD".index(q.answer)]
        assert any(answer in doc for doc in corpus)
    assert json.loads((synth_dir / "synth.json").read_text())["docs_per_task"] == 6
