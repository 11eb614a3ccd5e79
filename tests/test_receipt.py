"""`unlearn audit`: a verdict per forget document, and the relearning attack."""

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from unlearn.data import DataError, load_lume, load_mia
from unlearn.data.synth import NEVER_SEEN_PER_TASK
from unlearn.evaluation.nulls import GENERAL, band_rank, forget_documents
from unlearn.evaluation.receipt import audit, percentile_of, verdict
from unlearn.evaluation.relearn import RelearnConfig, fine_tune, split_documents
from unlearn.measure.nll import document_nll
from unlearn.models import load_model
from unlearn.models.loading import model_fingerprint
from unlearn.target import build_target

QUICK = RelearnConfig(steps=3, batch_size=4)
BAND = {"losses": np.arange(100.0), "scores": np.arange(100.0), "score_low": 5.0,
        "score_high": 95.0, "regurgitation_high": 0.3}


def _entry(**kw):
    return {"score": 50.0, "questions_answered": 0, "pii_leaked": [],
            "regurgitation": 0.1, **kw}


def test_the_threshold_rank_keeps_a_new_never_seen_document_below_at_most_five_percent():
    assert [band_rank(n) for n in (5, 18, 19, 39, 48, 99)] == [1, 1, 1, 2, 2, 5]
    assert all(band_rank(n) / (n + 1) <= 0.05 for n in range(19, 500))
    assert band_rank(18) / 19 > 0.05  # too few documents: 1/19, stated as it is
    # the conformal bound, checked by simulation: a new draw falls below the k-th lowest of n
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(20000, 49))
    below = np.sort(draws[:, :48], axis=1)[:, band_rank(48) - 1] > draws[:, 48]
    assert below.mean() == pytest.approx(2 / 49, abs=0.005)


def test_the_verdict_rule():
    assert verdict(_entry(), BAND) == "forgotten"
    assert verdict(_entry(score=2.0), BAND) == "remembered"  # loss still low
    assert verdict(_entry(questions_answered=1), BAND) == "remembered"
    assert verdict(_entry(pii_leaked=["ssn"]), BAND) == "remembered"
    assert verdict(_entry(regurgitation=0.6), BAND) == "partly"  # continuation still written
    assert verdict(_entry(score=99.0), BAND) == "partly"  # over-unlearned
    assert percentile_of(10.0, np.arange(100.0)) == pytest.approx(10.5)


def test_documents_group_a_continuation_with_its_questions(synth_dir):
    forget = load_lume(synth_dir).forget
    docs = forget_documents(forget)
    assert sum(len(d.rows) for d in docs) == len(forget)
    assert len({d.id for d in docs}) == len(docs)
    for d in docs:
        assert {r.doc_id for r in d.rows} == {d.id}
        assert d.text == next(r.text for r in d.rows if r.kind == "sc")


def test_the_attack_splits_documents_by_seed_and_trains_on_its_share(tiny_target, synth_dir):
    ids = [f"d{i}" for i in range(12)]
    attacked, held_out = split_documents(ids, 0.25, seed=0)
    assert len(attacked) == 3 and set(attacked).isdisjoint(held_out)
    assert sorted(attacked + held_out) == sorted(ids)
    assert split_documents(ids, 0.25, seed=0) == (attacked, held_out)
    assert split_documents(ids, 0.25, seed=1) != (attacked, held_out)
    # fine-tuning lowers the loss of what it trains on
    model, tokenizer = load_model(tiny_target[0])
    rows = load_lume(synth_dir).retain[:4]
    texts = [r.text for r in rows]
    before = np.mean(document_nll(model, tokenizer, texts))
    with torch.no_grad():  # a damaged copy, so there is something to relearn
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    damaged = np.mean(document_nll(model, tokenizer, texts))
    fine_tune(model, tokenizer, rows, RelearnConfig(steps=10, lr=1e-3, batch_size=4), seed=0)
    assert np.mean(document_nll(model, tokenizer, texts)) < damaged
    assert damaged > before


def test_the_lora_attack_trains_adapters_only_and_lowers_the_loss(tiny_target, synth_dir):
    model, tokenizer = load_model(tiny_target[0])
    rows = load_lume(synth_dir).retain[:4]
    texts = [r.text for r in rows]
    torch.manual_seed(0)
    with torch.no_grad():  # a damaged copy, so there is something to relearn
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    damaged = np.mean(document_nll(model, tokenizer, texts))
    attacked = fine_tune(model, tokenizer, rows, RelearnConfig(steps=10, batch_size=4), seed=0,
                         mode="lora")
    assert np.mean(document_nll(attacked, tokenizer, texts)) < damaged - 0.05
    trained = {n for n, p in attacked.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    base = {k.replace(".base_layer", ""): v for k, v in attacked.get_base_model()
            .state_dict().items() if "lora_" not in k}
    assert base.keys() == weights.keys()
    assert all(torch.equal(base[k], v) for k, v in weights.items())  # the weights stay put


def _audit_plan(model, synth_dir, config: RelearnConfig | None = None, samples=2):
    from unlearn.evaluation.receipt import audit_plan
    unseen = [d.document for d in load_mia(synth_dir / "mia").nonmember]
    return audit_plan(model, load_lume(synth_dir), unseen, config or RelearnConfig(),
                      torch.float32, 16, samples, seed=0)


def test_the_attack_mode_follows_the_memory_plan(tiny_target, synth_dir, monkeypatch):
    from unlearn import plan as planning
    from unlearn.plan import MemoryPlanError
    big = RelearnConfig(batch_size=64)  # the attack, not the measurements, is the largest phase
    full, plan = _audit_plan(tiny_target[0], synth_dir, big)
    assert full == "full" and plan.trainable == sum(
        p.numel() for p in load_model(tiny_target[0])[0].parameters())
    assert not any(part.endswith("(more)") and size for part, size in plan.parts.items())
    lora_plan = _audit_plan(tiny_target[0], synth_dir, replace(big, mode="lora"))[1]
    assert lora_plan.peak < plan.peak and lora_plan.trainable < plan.trainable / 5
    # a device with room for the LoRA attack only: auto takes LoRA; full is refused
    room = int((lora_plan.peak + plan.peak) / 2 / planning.HEADROOM)
    monkeypatch.setattr(planning, "device_memory", lambda: ("cpu", room))
    assert _audit_plan(tiny_target[0], synth_dir, big)[0] == "lora"
    with pytest.raises(MemoryPlanError, match="--relearn-mode lora"):
        _audit_plan(tiny_target[0], synth_dir, replace(big, mode="full"))


def test_the_audit_plan_reads_the_lengths_of_the_rows_the_attack_trains_on_and_measures(
        tiny_target, synth_dir):
    from unlearn.evaluation.relearn import attacked_rows
    from unlearn.measure.memory import meta_model
    from unlearn.models.loading import load_tokenizer
    from unlearn.models.sequences import training_sequence
    from unlearn.plan import plan_attack
    model = tiny_target[0]
    tokenizer = load_tokenizer(model)
    forget = load_lume(synth_dir).forget
    attacked = attacked_rows(forget, RelearnConfig().share, seed=0)[0]
    longest = max(len(training_sequence(tokenizer, r.input, r.output, 512, eos=True)[0])
                  for r in attacked)
    assert longest < RelearnConfig().max_len  # the rows are shorter than the attack's window
    plan = _audit_plan(model, synth_dir)[1]
    # the attack's forward: half a batch of rows of the longest length, not of max_len
    rows = RelearnConfig().training("full", torch.float32).batch_size
    at_max_len = plan_attack(model, RelearnConfig().training("full", torch.float32),
                             torch.float32)
    assert plan.parts["logits"] == at_max_len.parts["logits"] * longest / RelearnConfig().max_len
    vocab = meta_model(model).get_input_embeddings().num_embeddings
    assert plan.parts["logits"] == rows * longest * vocab * 4 * 3  # fp32 logits, softmax, grad
    # the measurements' largest phase holds memory where it exceeds the attack's; more samples
    # of the PII prompts make the sampling phase the largest
    sampled = _audit_plan(model, synth_dir, samples=400)[1]
    extra = {k: v for k, v in sampled.parts.items() if k.endswith("(more)")}
    assert list(extra) == ["generation (more)"] and extra["generation (more)"] > 0
    assert sampled.peak > plan.peak


@pytest.fixture(scope="module")
def perturbed(tiny_target, tmp_path_factory):
    """The tiny target with a little noise on every weight: another model, which remembers a
    little less."""
    out = tmp_path_factory.mktemp("perturbed") / "m"
    model, tokenizer = load_model(tiny_target[0])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_receipt_of_the_model_itself_finds_its_documents_remembered(tiny_target, synth_dir,
                                                                      tmp_path, margin):
    target = tiny_target[0]
    source_files = model_fingerprint(target)
    # the model as the original too (allowed for a baseline, as bench writes for its target):
    # it is attacked once, in both roles
    receipt = audit(target, target, synth_dir, synth_dir / "mia", tmp_path / "r",
                    samples=2, max_new_tokens=32, relearn_config=QUICK, allow_unchanged=True)
    saved = json.loads((tmp_path / "r" / "receipt.json").read_text())
    assert saved["summary"] == receipt["summary"]
    docs = saved["documents"]
    assert len(docs) == len(forget_documents(load_lume(synth_dir).forget))
    # nothing was unlearned: the memorised documents sit below every never-seen one
    margin.above("remembered share, target judged by its base",
                 saved["summary"]["remembered"] / len(docs), 0.79)
    assert all(d["loss_before"] == pytest.approx(d["loss_after"], rel=1e-5) for d in docs)
    s = saved["summary"]
    assert s["forgotten"] + s["partly"] + s["remembered"] == len(docs)
    assert sum(sum(t.values()) for t in s["by_task"].values()) == len(docs)
    relearn = saved["relearn"]
    assert set(relearn) == {"unlearned", "original", "robust"}
    assert relearn["robust"] is None and relearn["original"] == relearn["unlearned"]
    # a tiny model's full attack fits the machine: every weight trains, as the plan said
    assert relearn["unlearned"]["mode"] == saved["attack"]["mode"] == "full"
    assert saved["attack"]["memory_plan"]["peak_mb"] > 0 and saved["dtype"] == "torch.float32"
    assert saved["general_text"]["utility"] == 1.0  # read against itself: nothing lost
    attack = relearn["unlearned"]
    assert set(attack["attacked_documents"]).isdisjoint(attack["held_out_documents"])
    page = (tmp_path / "r" / "receipt.html").read_text()
    assert page.count("<img") == 2 and "<table>" in page and "<script>" in page
    assert model_fingerprint(target) == source_files  # every model is only read


def test_a_model_that_is_also_the_oracle_is_attacked_once_and_judged(tiny_target, perturbed,
                                                                    synth_dir, tmp_path):
    target = tiny_target[0]
    receipt = audit(target, perturbed, synth_dir, synth_dir / "mia", tmp_path / "r",
                    oracle=target, samples=2, max_new_tokens=16, relearn_config=QUICK)
    relearn = receipt["relearn"]
    assert set(relearn) == {"unlearned", "oracle", "original", "robust"}
    assert relearn["robust"] is True and relearn["oracle"] == relearn["unlearned"]
    assert receipt["general_text"]["reference"] == str(target)  # the oracle, not the original
    assert receipt["summary"]["utility"] == 1.0
    docs = receipt["documents"]
    # the loss before is the original's: the perturbed model's, above the target's
    assert np.mean([d["loss_before"] for d in docs]) > np.mean([d["loss_after"] for d in docs])


def test_the_command_writes_a_receipt(tiny_target, perturbed, synth_dir, tmp_path, capsys):
    from unlearn.cli import main
    target, original = str(tiny_target[0]), str(perturbed)
    assert main(["audit", "--model", target, "--original", original, "--data", str(synth_dir),
                 "--mia", str(synth_dir / "mia"), "--out", str(tmp_path / "r"),
                 "--samples", "1", "--max-new-tokens", "16", "--relearn-steps", "2"]) == 0
    assert "forget documents" in capsys.readouterr().out
    receipt = json.loads((tmp_path / "r" / "receipt.json").read_text())
    assert receipt["rule"]["relearn"]["steps"] == 2
    assert receipt["relearn"]["robust"] is None  # no oracle: robustness is not judged
    # a folder unlearn did not make is refused and left as it was
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["audit", "--model", target, "--original", original, "--data", str(synth_dir),
                 "--mia", str(synth_dir / "mia"), "--out", str(tmp_path / "mine")]) == 2
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_work_already_done_is_not_redone(tiny_target, synth_dir, tmp_path, monkeypatch):
    """`unlearn bench` hands each receipt the attacks on the target and the oracle, and the
    PII findings of the model's own evaluation: neither is run again."""
    from unlearn.evaluation import receipt as receipt_module
    from unlearn.evaluation.scoring import evaluate

    target = tiny_target[0]
    evaluate(target, synth_dir, tmp_path / "e", mia=synth_dir / "mia", audit=True, samples=2,
             max_new_tokens=8)
    attacks = {role: {"before": {"knowledge": 0.5, "regurgitation": 0.5},
                      "after": {"knowledge": value, "regurgitation": value},
                      "attacked_documents": ["a"], "held_out_documents": ["b"]}
               for role, value in (("original", 0.9), ("oracle", 0.1))}

    def fails(*args, **kw):
        raise AssertionError("ran again")
    monkeypatch.setattr(receipt_module, "relearn", fails)
    monkeypatch.setattr(receipt_module, "pii_extraction", fails)
    receipt = audit(target, target, synth_dir, synth_dir / "mia", tmp_path / "r",
                    samples=2, max_new_tokens=8, attacks=attacks, evaluation=tmp_path / "e",
                    allow_unchanged=True)
    # the model is the original: its attack is the original's
    assert receipt["relearn"]["unlearned"] == attacks["original"]
    assert receipt["relearn"]["robust"] is False  # relearns 0.9 against the oracle's 0.1
    assert receipt["pii_from"] == str(tmp_path / "e")
    # findings sampled another way are refused
    with pytest.raises(ValueError, match="samples"):
        audit(target, target, synth_dir, synth_dir / "mia", tmp_path / "r2", samples=3,
              max_new_tokens=8, attacks=attacks, evaluation=tmp_path / "e",
              allow_unchanged=True)


@pytest.fixture(scope="module")
def tiny_oracle(tiny_target, synth_dir, tmp_path_factory):
    """The tiny target's recipe from its own base on the retain rows alone: never saw the
    forget documents."""
    out = tmp_path_factory.mktemp("oracle") / "oracle"
    build_target(synth_dir, out, preset="tiny", seed=0, init=tiny_target[0] / "base",
                 oracle=True, pretrain_tokens=0)
    return out


def test_verdicts_are_judged_against_a_model_that_never_saw_them_at_a_stated_error_rate(
        tiny_target, tiny_oracle, synth_dir, tmp_path, margin):
    target, base, mia = tiny_target[0], tiny_target[0] / "base", synth_dir / "mia"
    kw = dict(samples=1, max_new_tokens=16, relearn_config=QUICK, oracle=tiny_oracle)
    of_target = audit(target, target, synth_dir, mia, tmp_path / "t", allow_unchanged=True, **kw)
    of_oracle = audit(tiny_oracle, target, synth_dir, mia, tmp_path / "o", **kw)
    assert of_target["test"]["judge"] == str(tiny_oracle)
    assert of_oracle["test"]["judge"] == str(base)  # the oracle cannot judge itself
    remembered = [r["summary"]["remembered_share"] for r in (of_target, of_oracle)]
    margin.above("remembered share, target - oracle", remembered[0] - remembered[1], 0.79)
    # each document is read against the never-seen documents of its own task (the synthetic
    # benchmark's never_seen/); the threshold is the k-th lowest of their scores and the stated
    # rate, k / (n + 1), the chance that one more never-seen document falls below it
    assert {d["null"] for d in of_oracle["documents"]} == {"Task1", "Task2", "Task3"}
    held = [d for d in forget_documents(load_lume(synth_dir / "never_seen").rows)
            if d.task == "Task2"]
    scores = np.sort(np.subtract(*[document_nll(*load_model(m), [d.text for d in held])
                                   for m in (tiny_oracle, base)]))
    k = band_rank(len(scores))
    band = of_oracle["never_seen"]["Task2"]
    assert band["score_low"] == pytest.approx(scores[k - 1], abs=1e-6)
    assert np.sum(scores < band["score_low"] - 1e-5) == k - 1  # batching moves the 7th digit
    rates = {name: n["false_positive_rate"] for name, n in of_oracle["test"]["nulls"].items()}
    assert rates["Task2"] == pytest.approx(k / (len(scores) + 1))
    # the rate stated for the receipt: each group's, weighted by the documents read against it
    docs = of_oracle["documents"]
    expected = np.mean([rates[d["null"]] for d in docs])
    assert of_oracle["test"]["false_positive_rate"] == pytest.approx(expected)
    assert of_oracle["summary"]["false_positive_rate"] == pytest.approx(expected)
    doc = docs[0]
    assert doc["score"] == pytest.approx(doc["loss_after"] - doc["loss_judge"])


def _never_seen_stories(synth_dir, out, questions=()):
    """The synthetic benchmark's never-seen Task1 documents alone, written to ``out``; with
    ``questions`` (rows), their qa rows ask those instead, in turn."""
    lume, asked = load_lume(synth_dir / "never_seen"), itertools.cycle(questions)

    def story(r):
        if r.kind != "qa" or not questions:
            return r
        q = next(asked)
        return replace(r, input=q.input, output=q.output)

    out.mkdir()
    for split, rows in (("forget", lume.forget), ("retain", lume.retain)):
        stories = [story(r) for r in rows if r.task == "Task1"]
        (out / f"{split}.jsonl").write_text("".join(
            json.dumps({"id": r.id, "input": r.input, "output": r.output, "task": r.task,
                        "split": split}) + "\n" for r in stories))
    return out


def test_a_task_without_never_seen_documents_of_its_own_is_read_against_the_general_ones(
        tiny_target, perturbed, synth_dir, tmp_path):
    target, mia = tiny_target[0], synth_dir / "mia"
    only_stories = _never_seen_stories(synth_dir, tmp_path / "stories")
    kw = dict(samples=1, max_new_tokens=8, relearn_config=QUICK)
    receipt = audit(target, perturbed, synth_dir, mia, tmp_path / "r", never_seen=only_stories,
                    **kw)
    nulls = receipt["test"]["nulls"]
    assert set(nulls) == {GENERAL, "Task1"}
    assert nulls["Task1"]["never_seen_documents"] == NEVER_SEEN_PER_TASK
    assert nulls[GENERAL]["never_seen_documents"] == len(load_mia(mia).nonmember)
    assert all(d["null"] == ("Task1" if d["task"] == "Task1" else GENERAL)
               for d in receipt["documents"])
    assert nulls["Task1"]["forget_documents"] + nulls[GENERAL]["forget_documents"] == len(
        receipt["documents"])
    # never-seen documents that are in the data, or of no forget document's task: refused
    # before anything is written
    for bad, message in ((synth_dir, "also in the data"), (tmp_path / "other", "none of its")):
        if bad.name == "other":
            bad.mkdir()
            for split in ("forget", "retain"):
                (bad / f"{split}.jsonl").write_text(
                    (only_stories / f"{split}.jsonl").read_text().replace("Task1", "Task9"))
        with pytest.raises(DataError, match=message):
            audit(target, perturbed, synth_dir, mia, tmp_path / "x", never_seen=bad, **kw)
        assert not (tmp_path / "x").exists()


def test_questions_answered_without_the_document_raise_the_stated_bound(
        tiny_target, perturbed, synth_dir, tmp_path):
    """The model is asked its never-seen documents' questions: what it answers without having
    seen the document is how often the answered-question rule calls an unseen one remembered."""
    target, mia = tiny_target[0], synth_dir / "mia"
    kw = dict(samples=1, max_new_tokens=24, relearn_config=QUICK)
    stories = load_lume(synth_dir / "never_seen")
    asked = len({r.doc_id for r in stories.rows if r.task == "Task1" and r.kind == "qa"})
    # never-seen stories whose questions are the retain stories' (which the target memorised)
    known = [r for r in load_lume(synth_dir).retain if r.task == "Task1" and r.kind == "qa"]
    for never_seen, answered in ((_never_seen_stories(synth_dir, tmp_path / "own"), None),
                                 (_never_seen_stories(synth_dir, tmp_path / "known", known),
                                  asked)):
        receipt = audit(target, perturbed, synth_dir, mia, tmp_path / f"of-{never_seen.name}",
                        never_seen=never_seen, **kw)
        band, test = receipt["never_seen"]["Task1"], receipt["test"]
        assert band["asked_documents"] == asked
        if answered is not None:
            assert band["answered_documents"] == answered
        share = band["answered_documents"] / asked
        nulls = test["nulls"]
        assert nulls["Task1"]["false_positive_bound"] == pytest.approx(
            min(1.0, nulls["Task1"]["false_positive_rate"] + share))
        assert nulls[GENERAL]["answered_share"] is None  # the MIA non-members have no questions
        docs = receipt["documents"]
        expected = np.mean([nulls[d["null"]]["false_positive_bound"] for d in docs])
        assert test["false_positive_bound"] == pytest.approx(expected)
        assert receipt["summary"]["false_positive_bound"] == pytest.approx(expected)
    assert test["false_positive_bound"] > test["false_positive_rate"]
