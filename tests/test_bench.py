import json

import pandas as pd
import pytest

from unlearn.data import load_mia
from unlearn.leaderboard import bench
from unlearn.models.loading import model_fingerprint, teacher_of


def test_bench_compares_methods_with_target_and_oracle(synth_dir, tmp_path):
    board = bench(synth_dir, tmp_path / "b", methods=("gd",), preset="tiny",
                  settings={"gd": {"epochs": 2, "batch_size": 4}},
                  target_settings={"epochs": 30, "pretrain_tokens": 8000})
    names = [r["model"] for r in board["rows"]]
    assert names == ["target", "oracle", "gd"]
    rows = {r["model"]: r for r in board["rows"]}
    # the oracle never saw the forget set: it knows less of it than the target does
    def regurgitated(name):
        return sum(rows[name][f"forget Task{t} regurgitation"] for t in (1, 2, 3))
    assert regurgitated("oracle") < regurgitated("target") - 0.3, rows
    assert rows["oracle"]["vs oracle"] == 1.0
    # general text: every model's reading of never-seen documents set against the oracle's
    assert rows["oracle"]["utility u"] == 1.0 and rows["oracle"]["S"] == 1.0
    assert all(r["reference never-seen NLL"] == rows["oracle"]["never-seen NLL"]
               for r in rows.values())
    assert rows["gd"]["S"] == pytest.approx(rows["gd"]["vs oracle"] * rows["gd"]["utility u"])
    assert len(board["damaged"]) == sum(bool(r["general text damaged"]) for r in rows.values())
    # target and oracle are fine-tuned from one pretrained base, so they differ by the forget set
    records = {p.name.split("-")[0]: json.loads((p / "target.json").read_text())
               for p in (tmp_path / "b" / "cache").iterdir()}
    assert records["target"]["init"] == records["oracle"]["init"]
    assert records["target"]["init"].split("/")[-1].startswith("base-")
    assert records["base"]["epochs"] == {"pretrain": records["base"]["epochs"]["pretrain"]}
    # the target's training time counts its base's pretraining too
    target_seconds = records["base"]["train_seconds"] + records["target"]["train_seconds"]
    assert rows["gd"]["fraction of target training"] == pytest.approx(
        rows["gd"]["unlearn seconds"] / target_seconds)
    # the oracle's cost is exact retraining: fine-tuning the base on the retain rows
    assert rows["oracle"]["unlearn seconds"] == records["oracle"]["train_seconds"]
    assert rows["oracle"]["fraction of target training"] == pytest.approx(
        records["oracle"]["train_seconds"] / target_seconds)
    frame = pd.read_csv(tmp_path / "b" / "leaderboard.csv")
    assert list(frame["model"]) == names
    assert "| model |" in (tmp_path / "b" / "leaderboard.md").read_text()
    page = (tmp_path / "b" / "report.html").read_text()
    assert page.count("<img") >= 4 and "<table" in page
    # every model audited: a receipt each, the attack's figures in its row and in the report
    receipts = {m: json.loads((tmp_path / "b" / "seed0" / f"audit-{m}" / "receipt.json")
                              .read_text()) for m in names}
    for m in names:
        summary = receipts[m]["summary"]
        assert rows[m]["forgotten share"] == summary["forgotten_share"]
        assert rows[m]["remembered share"] == summary["remembered_share"]
        assert rows[m]["relearned knowledge"] == summary["relearned"]["unlearned"]["knowledge"]
        assert receipts[m]["relearn"]["original"] == receipts["target"]["relearn"]["unlearned"]
        assert receipts[m]["pii_from"].endswith(f"eval-{m}")
    assert rows["oracle"]["relearn robust"] is True  # the oracle is its own yardstick
    # the oracle judges every verdict but its own: the base the target memorised from does
    target = receipts["target"]["original"]
    assert receipts["oracle"]["test"]["judge"] == str(teacher_of(target)) != "None"
    assert receipts["gd"]["test"]["judge"] == receipts["gd"]["oracle"]
    assert 'href="seed0/audit-gd/receipt.html"' in page and "Relearning attack" in page
    record = json.loads((tmp_path / "b" / "seed0" / "gd" / "run.json").read_text())
    assert all("eval" in e for e in record["history"])  # a trajectory per epoch
    # a target fine-tuned from a base this package trained from scratch is still a small model
    assert record["profile"] == "small"
    # a second run reuses every cached stage
    run_json = tmp_path / "b" / "seed0" / "gd" / "run.json"
    made = run_json.stat().st_mtime_ns
    again = bench(synth_dir, tmp_path / "b", methods=("gd",), preset="tiny",
                  settings={"gd": {"epochs": 2, "batch_size": 4}},
                  target_settings={"epochs": 30, "pretrain_tokens": 8000})
    assert again["rows"] == board["rows"] and run_json.stat().st_mtime_ns == made
    receipt_json = tmp_path / "b" / "seed0" / "audit-gd" / "receipt.json"
    assert json.loads(receipt_json.read_text()) == receipts["gd"]
    # ... but not a run or its evaluation made with other settings
    changed = bench(synth_dir, tmp_path / "b", methods=("gd",), preset="tiny",
                    settings={"gd": {"epochs": 2, "batch_size": 4, "lr": 3e-3}},
                    target_settings={"epochs": 30, "pretrain_tokens": 8000})
    assert json.loads(run_json.read_text())["config"]["lr"] == 3e-3
    evaluated = json.loads((tmp_path / "b" / "seed0" / "eval-gd" / "eval.json").read_text())
    assert evaluated["model_files"] == model_fingerprint(run_json.parent)
    assert changed["rows"][:2] == board["rows"][:2]  # target and oracle reused
    # every run chooses its model on a held-out split of the MIA set; every model is scored on
    # the rest
    record = json.loads(run_json.read_text())
    assert record["selection"]["rule"] == "score"
    calibrated = set(record["selection"]["calibration_ids"])
    full = load_mia(synth_dir / "mia")
    assert calibrated < {d.id for d in full.member + full.nonmember}
    for model in ("target", "oracle", "gd"):
        scored = {i for kind in ("member", "nonmember") for i in pd.read_csv(
            tmp_path / "b" / "seed0" / f"eval-{model}" / "mia_results" / f"{kind}_0.csv")["id"]}
        assert scored and not scored & calibrated
        assert len(scored) + len(calibrated) == len(full.member) + len(full.nonmember)
    # a `label:method` variant, with its settings under its label: here the fixed schedule
    fixed = bench(synth_dir, tmp_path / "s", methods=("gd_fixed:gd",), preset="tiny",
                  cache=tmp_path / "b" / "cache",
                  settings={"gd_fixed": {"epochs": 2, "batch_size": 4, "select": "none"}},
                  target_settings={"epochs": 30, "pretrain_tokens": 8000}, receipts=False)
    assert [r["model"] for r in fixed["rows"]] == ["target", "oracle", "gd_fixed"]
    assert "forgotten share" not in fixed["rows"][0]  # no receipts asked for
    record = json.loads((tmp_path / "s" / "seed0" / "gd_fixed" / "run.json").read_text())
    assert record["method"] == "gd" and record["selection"] is None
    assert record["steps_trained"] == record["steps"]


def test_bench_unlearns_a_given_model_and_leaves_it_as_it_was(synth_dir, tiny_target, tmp_path):
    target, _ = tiny_target
    before = model_fingerprint(target)
    board = bench(synth_dir, tmp_path / "b", methods=("ga",), mia=None, mmlu=None,
                  settings={"ga": {"epochs": 1, "batch_size": 4}}, eval_points=1,
                  target=target)
    rows = {r["model"]: r for r in board["rows"]}
    assert list(rows) == ["target", "ga"]  # no oracle given: none built, none scored against
    assert rows["ga"]["vs oracle"] is None
    assert not (tmp_path / "b" / "cache").exists()
    record = json.loads((tmp_path / "b" / "seed0" / "ga" / "run.json").read_text())
    assert record["model_files"] == before and model_fingerprint(target) == before
    with pytest.raises(ValueError, match="oracle= needs target="):
        bench(synth_dir, tmp_path / "c", oracle=target)


def test_a_given_target_costs_its_base_pretraining_where_unlearn_built_the_base(tmp_path):
    from unlearn.leaderboard import _built_base, _training_seconds
    base, target = tmp_path / "base", tmp_path / "target"
    for model, record in ((base, {"train_seconds": 30.0}),
                          (target, {"train_seconds": 10.0, "base": str(base)})):
        model.mkdir()
        (model / "config.json").write_text("{}")
        (model / "target.json").write_text(json.dumps(record))
    assert _built_base(target) == base
    assert _training_seconds(_built_base(target), target) == 40.0
    (base / "target.json").unlink()  # a base saved inside a from-scratch build: no record
    assert _built_base(target) is None
    assert _training_seconds(_built_base(target), target) == 10.0
