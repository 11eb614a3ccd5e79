"""--out never destroys what unlearn did not make (README: "When things go wrong")."""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from unlearn.cli import main
from unlearn.io import RUN, claim_output


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(capsys, argv: list[str], says: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err


def test_run_into_its_own_model_is_refused_and_the_model_is_untouched(tiny_target, synth_dir,
                                                                       capsys):
    model = tiny_target[0]
    before = _tree(model)
    _refused(capsys, ["run", "--method", "ga", "--model", str(model), "--data", str(synth_dir),
                      "--out", str(model), "epochs=1"], "is also the input --model")
    assert _tree(model) == before


def test_eval_or_run_into_an_input_directory_is_refused(tiny_target, synth_dir, capsys):
    model, data = tiny_target[0], synth_dir
    before = _tree(model), _tree(data)
    _refused(capsys, ["eval", "--model", str(model), "--data", str(data), "--out", str(model)],
             "is also the input --model")
    _refused(capsys, ["run", "--method", "ga", "--model", str(model), "--data", str(data),
                      "--out", str(data)], "is also the input --data")
    _refused(capsys, ["run", "--method", "ga", "--model", str(model), "--data", str(data),
                      "--out", str(data / "inside")], "lies inside the input --data")
    _refused(capsys, ["eval", "--model", str(model), "--data", str(data),
                      "--out", str(data.parent)], "holds the input --data")
    assert (_tree(model), _tree(data)) == before
    assert not (data / "inside").exists()


def test_a_user_folder_or_file_is_never_replaced(tmp_path, capsys):
    folder = tmp_path / "u"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    _refused(capsys, ["data", "synth", "--out", str(folder), "--docs-per-task", "2"],
             "is not an output of `unlearn data synth` (it has no synth.json)")
    assert (folder / "thesis.txt").read_text() == "four years of work"
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    _refused(capsys, ["data", "synth", "--out", str(afile), "--docs-per-task", "2"],
             "exists and is not a directory")
    assert afile.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "u"]


def test_an_output_of_the_same_command_is_replaced_and_of_another_refused(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "synth", "--out", str(out), "--docs-per-task", "2", "--seed", "1"]) == 0
    first = _tree(out)
    assert main(["data", "synth", "--out", str(out), "--docs-per-task", "2", "--seed", "2"]) == 0
    assert _tree(out) != first and (out / "synth.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no .old or .tmp left beside it
    _refused(capsys, ["locate", "--model", str(tmp_path / "m"), "--data", str(out),
                      "--out", str(tmp_path)], "holds the input")
    with pytest.raises(ValueError, match="is not an output of `unlearn run`"):
        claim_output(out, RUN)


def test_an_empty_folder_made_for_the_output_is_used(tmp_path):
    (tmp_path / "d").mkdir()
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--docs-per-task", "2"]) == 0
    assert (tmp_path / "d" / "synth.json").is_file()


def test_a_staging_directory_unlearn_did_not_make_is_left_alone(tmp_path, capsys):
    stage = tmp_path / ".d.partial"
    stage.mkdir()
    (stage / "notes.txt").write_text("mine")
    _refused(capsys, ["data", "synth", "--out", str(tmp_path / "d"), "--docs-per-task", "2"],
             "was not made by unlearn")
    assert (stage / "notes.txt").read_text() == "mine" and not (tmp_path / "d").exists()


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["data", "synth", "--out", str(tmp_path / "d"), "--docs-per-task", "2"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644)
               for p in (tmp_path / "d").rglob("*"))


# ---- property: whatever --out names, no input file's bytes change ----

# each command as a function of (world, out); tiny budgets so a command that is allowed is quick
COMMANDS = {
    "synth": lambda w, o: ["data", "synth", "--out", o, "--docs-per-task", "2"],
    "target": lambda w, o: ["target", "--data", w["data"], "--out", o, "--preset", "tiny",
                            "epochs=1", "pretrain_tokens=500", "check_every=10"],
    "run": lambda w, o: ["run", "--method", "ga", "--model", w["model"], "--data", w["data"],
                         "--out", o, "epochs=1"],
    "eval": lambda w, o: ["eval", "--model", w["model"], "--data", w["data"], "--out", o,
                          "--max-new-tokens", "2"],
    "locate": lambda w, o: ["locate", "--model", w["model"], "--data", w["data"], "--out", o,
                            "--max-facts", "1", "--samples", "1"],
    "bench": lambda w, o: ["bench", "--data", w["data"], "--out", o, "--preset", "tiny",
                           "--methods", "ga"],
    # always refused: a method label that is a path, an audit of a model that was not changed
    "bench-label": lambda w, o: ["bench", "--data", w["data"], "--target", w["model"],
                                 "--methods", f"{o}:ga", "--out", w["bench"], "--no-receipts",
                                 "--eval-points", "0", f"{o}.epochs=1"],
    "audit-same": lambda w, o: ["audit", "--model", w["model"], "--original", w["model"],
                                "--oracle", w["model"], "--data", w["data"],
                                "--mia", w["data"] + "/mia", "--out", o],
}
RECORDS = {"synth": "synth.json", "target": "target.json", "run": "run.json",
           "eval": "eval.json", "locate": "trace.json", "bench": "bench.json",
           "bench-label": None, "audit-same": None}
PLACES = ["data", "data/mia", "model", "user", "user/thesis.txt", ".", "made-synth",
          "made-run", "made-eval"]


@pytest.fixture(scope="module")
def world_template(tiny_target, synth_dir, tmp_path_factory):
    """Inputs, a user's folder and finished outputs of three commands, to copy for each case."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(synth_dir, root / "data")
    shutil.copytree(tiny_target[0], root / "model")
    (root / "user").mkdir()
    (root / "user" / "thesis.txt").write_text("four years of work")
    world = {"data": str(root / "data"), "model": str(root / "model"),
             "bench": str(root / "bench")}
    for command in ("synth", "run", "eval"):
        assert main(COMMANDS[command](world, str(root / f"made-{command}"))) == 0
    return root


@settings(max_examples=12, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate],  # a failing case is shown as found: shrinking
          # one reruns whole commands for many minutes
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(sorted(COMMANDS)), st.sampled_from(PLACES)),
                min_size=1, max_size=4))
def test_no_command_changes_a_file_it_may_not_replace(world_template, steps):
    """The rule: a command changes files only under its OUT (and OUT's staging directory), and
    under OUT only when OUT was absent or a finished output of the same command; never its
    inputs."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "w"
        shutil.copytree(world_template, root)
        world = {"data": str(root / "data"), "model": str(root / "model"),
                 "bench": str(root / "bench")}
        for command, place in steps:
            out = root / place
            argv = COMMANDS[command](world, str(out))
            inputs = [Path(a) for i, a in enumerate(argv)  # what it reads, not its --out
                      if a in world.values() and argv[i - 1] != "--out"]
            may_replace = (RECORDS[command] is not None and out.is_dir()
                           and (out / RECORDS[command]).is_file()
                           and not any(out == i or out in i.parents or i in out.parents
                                       for i in inputs))
            before = _tree(root)
            code = main(argv)
            after = _tree(root)
            mine = (f"{place}/", f".{out.name}.partial/") if may_replace else ()
            for name, digest in before.items():
                if not name.startswith(mine):
                    assert after.get(name) == digest, (argv, name)
            assert code == (0 if may_replace else 2), argv
            if not may_replace:  # a refusal leaves nothing behind, not even an empty staging
                assert set(after) == set(before), (argv, set(after) - set(before))
                assert not any(p.name.endswith(".partial") for p in root.rglob("*")), argv
            assert not any(".partial/" in name for name in after), argv  # staging is gone
