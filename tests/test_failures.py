"""Bad input and bad luck end in one line and exit 2 (130 for Ctrl-C), never a traceback, and
leave nothing behind (README: "When things go wrong")."""

import json
import shutil

import pytest
import torch

from unlearn import cli
from unlearn.cli import main
from unlearn.evaluation.scoring import evaluate
from unlearn.measure.nll import document_nll
from unlearn.models import load_model


def _fails(capsys, argv, says, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    return err


def _run(model, data, out, *settings):
    return ["run", "--method", "ga", "--model", str(model), "--data", str(data), "--out",
            str(out), *settings]


def test_a_model_directory_without_a_tokenizer_is_refused(tiny_target, synth_dir, tmp_path,
                                                          capsys):
    bare = tmp_path / "m"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_target[0] / name, bare / name)
    _fails(capsys, _run(bare, synth_dir, tmp_path / "u", "epochs=1"), f"{bare}: no tokenizer")
    assert not (tmp_path / "u").exists() and not (tmp_path / ".u.partial").exists()


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"garbage"])
def test_corrupt_or_truncated_weights_are_refused(tiny_target, synth_dir, tmp_path, capsys,
                                                  damage):
    broken = tmp_path / "m"
    shutil.copytree(tiny_target[0], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    _fails(capsys, ["eval", "--model", str(broken), "--data", str(synth_dir), "--out",
                    str(tmp_path / "e")], "weights file is corrupt or truncated")


def test_settings_name_themselves_on_the_command_line(tiny_target, synth_dir, tmp_path, capsys):
    for setting, says in [("lr=abc", "lr=abc: expected a number"),
                          ("epochs=1.5", "epochs=1.5: expected a whole number"),
                          ("lora=maybe", "lora=maybe: expected true or false"),
                          ("layers=last:abc", "layers=last:abc: use all, last:K")]:
        _fails(capsys, _run(tiny_target[0], synth_dir, tmp_path / "u", setting), says)
    (tmp_path / "c.json").write_text('{"epochs": 1.5}')
    _fails(capsys, _run(tiny_target[0], synth_dir, tmp_path / "u", "--config",
                        str(tmp_path / "c.json")), "c.json: epochs=1.5: expected a whole number")


def test_late_settings_are_checked_before_anything_is_written(tiny_target, synth_dir, tmp_path,
                                                              capsys):
    (tmp_path / "badmia").mkdir()
    shutil.copy(synth_dir / "mia" / "member.jsonl", tmp_path / "badmia")
    _fails(capsys, _run(tiny_target[0], synth_dir, tmp_path / "u", "--mia",
                        str(tmp_path / "badmia")), "nonmember.jsonl: file not found")
    _fails(capsys, _run(tiny_target[0], synth_dir, tmp_path / "u", "schedule=nosuch"),
           "schedule=nosuch: use one of linear, cosine, constant")
    _fails(capsys, _run(tiny_target[0], synth_dir, tmp_path / "u", "layers=0-99"),
           "indices must lie in 0..3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["badmia"]


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "synthesize", interrupted)
    _fails(capsys, ["data", "synth", "--out", str(tmp_path / "d")],
           "interrupted; rerun the same command to resume", code=130)


@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory")])
def test_out_of_memory_is_one_line_with_what_to_lower(tmp_path, capsys, monkeypatch, error):
    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "synthesize", exhausted)
    _fails(capsys, ["data", "synth", "--out", str(tmp_path / "d")], "out of memory")


def test_a_row_far_longer_than_the_window_is_cut_to_fit(tiny_target, synth_dir, tmp_path):
    """Tokens beyond the model's window would fail or exhaust memory; they are cut."""
    window = json.loads((tiny_target[0] / "config.json").read_text())["max_position_embeddings"]
    long_text = "word " * (3 * window)
    data = tmp_path / "d"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("mia", "mmlu", "pretrain"))
    with open(data / "forget.jsonl", "a") as f:
        f.write(json.dumps({"id": "longsc1", "input": long_text, "output": long_text,
                            "task": "Task1"}) + "\n")
    evaluate(tiny_target[0], data, tmp_path / "e", max_new_tokens=4)
    rows = [json.loads(line) for line in (tmp_path / "e" / "generations.jsonl").open()]
    long_row = next(r for r in rows if r["id"] == "longsc1")
    assert isinstance(long_row["model_output"], str) and 0 < long_row["nll"] < 100
    model, tokenizer = load_model(tiny_target[0])
    # scored on its first window: two documents that differ only beyond it score the same
    same_start = [long_text + "alpha " * window, long_text + "beta gamma " * window]
    first, second = document_nll(model, tokenizer, same_start)
    assert 0 < first < 100 and first == pytest.approx(second, abs=1e-6)
