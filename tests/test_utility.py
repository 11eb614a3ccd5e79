"""The general-text utility beside the official score (unlearn.measure.utility)."""

import json
import math

import pytest

from unlearn.cli import main
from unlearn.engine import run
from unlearn.evaluation.scoring import evaluate
from unlearn.measure.utility import DAMAGED_BELOW, adjusted_share, general_text, utility


def test_utility_divides_by_e_per_nat_of_damage_and_flags_past_0_29_nats():
    assert utility(5.0, 5.0) == 1.0 and utility(4.0, 5.0) == 1.0  # below the reference: free
    assert utility(6.0, 5.0) == pytest.approx(math.exp(-1))
    assert general_text([5.27, 5.29], [5.0, 5.0], "ref")["damaged"] is False  # 0.28 nats
    entry = general_text([5.30, 5.30], [5.0, 5.0], "ref")  # 0.30 nats: LUME's 75% rule
    assert entry["damaged"] is True and entry["utility"] < DAMAGED_BELOW
    assert entry["never_seen_nll"] == pytest.approx(5.3) and entry["documents"] == 2
    assert adjusted_share(0.5, 0.8, 0.5) == pytest.approx(0.3125)
    assert adjusted_share(0.5, None, 0.5) is None and adjusted_share(0.5, 0.8, None) is None
    with pytest.raises(ValueError, match="same never-seen documents"):
        general_text([1.0], [1.0, 2.0], "ref")


@pytest.fixture(scope="module")
def wrecked(tiny_target, synth_dir, tmp_path_factory):
    """Unbounded ascent at a high rate: it wrecks text the model never saw too."""
    out = tmp_path_factory.mktemp("wrecked") / "ga"
    run("ga", tiny_target[0], synth_dir, out, epochs=2, lr=1e-2, select="none",
        forget_target="none")
    return out


def test_eval_sets_a_run_against_the_model_it_started_from_and_flags_damage(
        wrecked, tiny_target, synth_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(wrecked), "--data", str(synth_dir), "--out",
                 str(tmp_path / "e"), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    general = evaluate(wrecked, synth_dir, max_new_tokens=4)["general_text"]
    assert general["reference"] == str(tiny_target[0])  # found in run.json
    assert general["damaged"] is True
    assert general["never_seen_nll"] > general["reference_never_seen_nll"] + 0.29
    assert out.strip().splitlines()[-1].startswith(f"general text damaged: {wrecked}: "
                                                   f"never-seen NLL")
    own = evaluate(tiny_target[0], synth_dir, max_new_tokens=4, reference=tiny_target[0])
    assert own["general_text"]["utility"] == 1.0 and own["general_text"]["damaged"] is False
    none = evaluate(wrecked, synth_dir, max_new_tokens=4, reference=None)
    assert "general_text" not in none and none["never_seen_nll"] == general["never_seen_nll"]


def test_eval_reads_a_corpus_of_the_users_own_for_the_utility(wrecked, tiny_target, synth_dir,
                                                               tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    pages = ["The river runs past the mill and under the old stone bridge.",
             "A recipe: two cups of flour, one egg, and a pinch of salt."]
    for i, page in enumerate(pages):
        (texts / f"page{i}.txt").write_text(page)
    results = evaluate(wrecked, synth_dir, max_new_tokens=4, general=texts)
    general = results["general_text"]
    assert general["text"] == str(texts) and general["documents"] == 2
    mia_only = evaluate(wrecked, synth_dir, max_new_tokens=4)
    assert mia_only["general_text"]["text"] == "mia non-members"
    assert results["never_seen_nll"] != mia_only["never_seen_nll"]  # other documents read
    assert general["never_seen_nll"] > general["reference_never_seen_nll"]  # damage seen there
    (texts / "notes.md").write_text("not a document")
    assert main(["eval", "--model", str(wrecked), "--data", str(synth_dir), "--out",
                 str(tmp_path / "e"), "--general", str(texts)]) == 2
    assert "notes.md: not a .txt file" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_a_receipt_sets_general_text_against_the_original_without_an_oracle(
        wrecked, tiny_target, synth_dir, tmp_path, capsys):
    assert main(["audit", "--model", str(wrecked), "--original", str(tiny_target[0]),
                 "--data", str(synth_dir), "--mia", str(synth_dir / "mia"), "--out",
                 str(tmp_path / "a"), "--samples", "1", "--max-new-tokens", "8",
                 "--relearn-steps", "1"]) == 0
    receipt = json.loads((tmp_path / "a" / "receipt.json").read_text())
    assert receipt["general_text"]["reference"] == str(tiny_target[0])
    assert receipt["summary"]["general_text_damaged"] is True
    assert receipt["summary"]["utility"] == receipt["general_text"]["utility"] < DAMAGED_BELOW
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("general text damaged")
