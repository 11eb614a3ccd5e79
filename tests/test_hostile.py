"""What a careless or hostile user tried (issue 41): nothing is written outside OUT, nothing is
certified that was not done, every input is checked before any work, and every failure is one
line (README: "When things go wrong")."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError
from transformers import PreTrainedModel

from unlearn import cli, leaderboard, training
from unlearn.cli import MAX_LINE, main
from unlearn.evaluation import receipt
from unlearn.io import lock_path, writing
from unlearn.models import load_model


def _fails(capsys, argv, says) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    return err


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def no_model_loaded(monkeypatch):
    """Fail the test if a command loads a model: it was to be refused before any work."""
    def refused(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")
    for module in (receipt, leaderboard):
        monkeypatch.setattr(module, "load_model", refused, raising=False)
    monkeypatch.setattr(leaderboard, "evaluate", refused)
    monkeypatch.setattr(leaderboard, "run", refused)


@pytest.fixture(scope="module")
def sharded_copy(tiny_target, tmp_path_factory):
    """The tiny target saved in shards, one of them then lost."""
    out = tmp_path_factory.mktemp("sharded") / "m"
    model, tokenizer = load_model(tiny_target[0])
    model.save_pretrained(out, max_shard_size="500KB")
    tokenizer.save_pretrained(out)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    return out


@pytest.mark.parametrize("label", ["ABS", "../escaped", "target", "a.b"])
def test_a_bench_label_that_is_not_a_plain_name_is_refused(tiny_target, synth_dir, tmp_path,
                                                           capsys, no_model_loaded, label):
    victim = tmp_path / "victim"
    shutil.copytree(tiny_target[0], victim)
    label = str(victim) if label == "ABS" else label
    before = _listing(tmp_path)
    _fails(capsys, ["bench", "--data", str(synth_dir), "--target", str(tiny_target[0]),
                    "--methods", f"{label}:gd", "--out", str(tmp_path / "b"), "--no-receipts",
                    "--eval-points", "0", f"{label}.epochs=1"], "method label")
    assert _listing(tmp_path) == before


def test_bench_settings_and_methods_are_checked_before_any_work(tiny_target, synth_dir, tmp_path,
                                                               capsys, no_model_loaded):
    bench = ["bench", "--data", str(synth_dir), "--target", str(tiny_target[0]),
             "--out", str(tmp_path / "b")]
    _fails(capsys, [*bench, "--methods", "nosuch"], "unknown method 'nosuch'")
    _fails(capsys, [*bench, "--methods", "gd", "victim.epochs=1"],
           "settings for victim: no such method label")
    _fails(capsys, [*bench, "--methods", "gd", "gd.lr=abc"], "lr=abc: expected a number")
    _fails(capsys, [*bench, "--methods", "gd", "--oracle", str(tiny_target[0])],
           "holds the same weights as --target")
    _fails(capsys, ["bench", "--data", str(synth_dir), "--out", str(tmp_path / "b"),
                    "--methods", "nosuch", "--preset", "tiny"], "unknown method 'nosuch'")
    assert list(tmp_path.iterdir()) == []


def test_audit_refuses_a_model_or_oracle_that_is_the_original(tiny_target, synth_dir, tmp_path,
                                                             capsys, no_model_loaded):
    model, data = tiny_target[0], synth_dir
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)  # the same weights in another directory are the same model
    audit = ["audit", "--data", str(data), "--mia", str(data / "mia"), "--out",
             str(tmp_path / "a")]
    _fails(capsys, [*audit, "--model", str(model), "--original", str(model), "--oracle",
                    str(model)], "holds the same weights as --original")
    _fails(capsys, [*audit, "--model", str(copy), "--original", str(model)],
           "it was never unlearned")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_audit_checks_every_model_and_the_seed_before_any_work(tiny_target, synth_dir, tmp_path,
                                                              capsys, sharded_copy,
                                                              no_model_loaded):
    model, data = str(tiny_target[0]), synth_dir
    audit = ["audit", "--data", str(data), "--mia", str(data / "mia"), "--out",
             str(tmp_path / "a")]
    _fails(capsys, [*audit, "--model", str(sharded_copy), "--original", model], "weight shard")
    _fails(capsys, [*audit, "--model", "nosuch", "--original", model],
           "nosuch: model directory not found")
    _fails(capsys, [*audit, "--model", model, "--original", model, "--oracle", "nosuch"],
           "nosuch: model directory not found")
    _fails(capsys, [*audit, "--model", model, "--original", model, "--seed=-1"],
           "seed=-1: must be a whole number from 0")
    assert list(tmp_path.iterdir()) == []


def test_seeds_and_models_are_checked_before_anything_is_written(tiny_target, synth_dir,
                                                                 tmp_path, capsys, sharded_copy):
    model, data = str(tiny_target[0]), str(synth_dir)
    _fails(capsys, ["eval", "--model", model, "--data", data, "--out", str(tmp_path / "e"),
                    "--audit", "--seed", "99999999999999999999"], "seed=99999999999999999999")
    _fails(capsys, ["target", "--data", data, "--out", str(tmp_path / "t"), "--init",
                    str(sharded_copy), "--preset", "tiny"], "weight shard")
    _fails(capsys, ["data", "synth", "--out", str(tmp_path / "s"), "--seed", "-1"], "seed=-1")
    _fails(capsys, ["run", "--method", "gd", "--model", str(sharded_copy), "--data", data,
                    "--out", str(tmp_path / "r")], "weight shard")
    assert list(tmp_path.iterdir()) == []


def test_a_yaml_bomb_or_a_list_for_a_number_is_one_short_line(tiny_target, synth_dir, tmp_path,
                                                            capsys):
    nine = lambda name: ", ".join([f"*{name}"] * 9)  # noqa: E731
    levels = ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&{b} [{nine(a)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    (tmp_path / "bomb.yaml").write_text("lr: [" + ", ".join(levels) + "]\n")
    (tmp_path / "list.yaml").write_text("lr: [1, 2]\n")
    (tmp_path / "loop.yaml").write_text("lr: &a [*a]\n")
    (tmp_path / "long.json").write_text(json.dumps({"x" * 100_000: 1}))
    run = ["run", "--method", "gd", "--model", str(tiny_target[0]), "--data", str(synth_dir),
           "--out", str(tmp_path / "r"), "--config"]
    for config, says in [("bomb.yaml", "expands to more than 10,000 values"),
                         ("list.yaml", "lr: expected a number, not a list"),
                         ("loop.yaml", "an alias refers to the node that holds it"),
                         ("long.json", "unknown setting(s) xxx")]:
        err = _fails(capsys, [*run, str(tmp_path / config)], says)
        assert len(err) < MAX_LINE + 40
    assert not (tmp_path / "r").exists() and not (tmp_path / ".r.partial").exists()


def _holder(out: Path) -> subprocess.Popen:
    """Another process that holds the lock on writing ``out`` until it is killed."""
    code = (f"import time; from unlearn.io import lock_output; lock_output({str(out)!r}); "
            f"print('held', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_command_on_the_same_out_refuses_and_a_dead_ones_lock_is_taken_over(tmp_path,
                                                                                     capsys):
    out = tmp_path / "d"
    holder = _holder(out)
    try:
        _fails(capsys, ["data", "synth", "--out", str(out), "--docs-per-task", "2"],
               f"is being written by another unlearn command (pid {holder.pid})")
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its lock file stays behind
        holder.wait()
    assert lock_path(out).exists()
    assert main(["data", "synth", "--out", str(out), "--docs-per-task", "2"]) == 0
    assert (out / "synth.json").is_file() and not lock_path(out).exists()


def test_two_runs_at_once_one_runs_and_the_other_refuses(tiny_target, synth_dir, tmp_path):
    """Two real processes: the loser refuses at once, the winner's output is its own."""
    argv = [sys.executable, "-m", "unlearn.cli", "run", "--method", "gd", "--model",
            str(tiny_target[0]), "--data", str(synth_dir), "--out", str(tmp_path / "r"),
            "epochs=2"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    while first.poll() is None and not lock_path(tmp_path / "r").exists():
        time.sleep(0.1)
    second = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert first.wait() == 0, first.stderr.read()
    assert second.returncode == 2 and "is being written by another unlearn" in second.stderr
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["status"] == "complete"
    assert len(list((tmp_path / "r" / "logs").rglob("events.out.tfevents*"))) <= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_full_disk_says_errno_28_and_keeps_the_checkpoint_to_resume_from(
        tiny_target, synth_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UNLEARN_CHECKPOINT_MINUTES", "0")
    real_save = PreTrainedModel.save_pretrained

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    argv = ["run", "--method", "gd", "--model", str(tiny_target[0]), "--data", str(synth_dir),
            "--out", str(tmp_path / "r"), "epochs=1", "select=none"]
    _fails(capsys, argv, "[Errno 28] No space left on device")
    staging = tmp_path / ".r.partial"
    assert (staging / "checkpoint" / "progress.json").is_file()
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    steps = []
    monkeypatch.setattr(training.Trainer, "step", lambda *a, **k: steps.append(1))
    assert main(argv) == 0  # resumed: the one epoch is in the checkpoint, nothing retrained
    assert steps == [] and (tmp_path / "r" / "run.json").is_file()
    assert not staging.exists()


def test_a_failed_torch_write_is_reported_as_the_os_error_it_stands_for(tmp_path, monkeypatch):
    broken = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    free = {"bytes": 0}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
        10**9, 10**9 - free["bytes"], free["bytes"]))
    with pytest.raises(OSError) as full, writing(tmp_path / "x.pt"):
        raise broken
    assert full.value.errno == errno.ENOSPC and str(tmp_path / "x.pt") in str(full.value)
    free["bytes"] = 10**9
    with pytest.raises(OSError) as other, writing(tmp_path / "x.pt"):
        raise broken
    assert other.value.errno == errno.EIO and "writing failed" in str(other.value)
    with pytest.raises(KeyError), writing(tmp_path / "x.pt"):  # not a write: left as it is
        raise KeyError("weight")


def test_data_import_refuses_a_folder_entry_it_would_drop(tmp_path, capsys):
    forget = tmp_path / "forget"
    (forget / "sub").mkdir(parents=True)
    (forget / "a.txt").write_text("Alice lives at 12 Elm Road.")
    (forget / "sub" / "c.txt").write_text("Carol was born in 1970.")
    (forget / "notes.md").write_text("Dave likes tea.")
    (tmp_path / "retain.jsonl").write_text('{"text": "Paris is the capital of France."}\n')
    assert main(["data", "import", "--forget", str(forget), "--retain",
                 str(tmp_path / "retain.jsonl"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "notes.md: not a .txt file" in err and "sub: a folder" in err
    assert not (tmp_path / "d").exists()


def test_a_bad_checkpoint_interval_is_one_line_naming_the_variable(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("UNLEARN_CHECKPOINT_MINUTES", "abc")
    imported = subprocess.run([sys.executable, "-c", "import unlearn.cli"], capture_output=True,
                              text=True, env={**os.environ, "UNLEARN_CHECKPOINT_MINUTES": "abc"})
    assert imported.returncode == 0, imported.stderr
    _fails(capsys, ["data", "synth", "--out", str(tmp_path / "d")],
           "UNLEARN_CHECKPOINT_MINUTES=abc: expected a number of minutes")
    for bad in ("-1", "nan", "inf"):
        monkeypatch.setenv("UNLEARN_CHECKPOINT_MINUTES", bad)
        with pytest.raises(ValueError, match="UNLEARN_CHECKPOINT_MINUTES"):
            training.checkpoint_minutes()
    assert not (tmp_path / "d").exists()


def test_a_link_as_out_is_named_and_data_check_reads_the_mia_set(synth_dir, tmp_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _fails(capsys, ["data", "synth", "--out", str(tmp_path / "link")], "is a symbolic link")
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    assert main(["data", "check", str(data)]) == 0
    assert '"nonmember":' in capsys.readouterr().out
    (data / "mia" / "nonmember.jsonl").write_text("")
    _fails(capsys, ["data", "check", str(data)], "nonmember.jsonl: no documents")
    assert main(["data", "check", str(data), "--mia", "none"]) == 0


def test_a_huge_error_message_is_cut_to_a_screen(capsys, monkeypatch, tmp_path):
    def verbose(*args, **kwargs):
        raise ValueError("\n".join(["x" * 10_000] * 100))
    monkeypatch.setattr(cli, "synthesize", verbose)
    assert main(["data", "synth", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert len(err) < 30 * (MAX_LINE + 40) and "more lines" in err
