"""Each test the suite leans on fails when the feature it guards breaks (issue 46).

    python bench/mutations.py [--only NAME,...]

For every mutation below (a breaking change, written as the one line it replaces), a clean copy
of the committed tree (``git worktree``, detached at HEAD) gets the change, and the tests named
beside it run there; the mutation is *caught* when pytest fails. Nothing in this checkout is
touched. Prints one row per mutation and writes ``bench/results/mutations.json``; a mutation
that is not caught is a test to strengthen.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str  # the exact text replaced (must occur once)
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("ROUGE-L F1 in place of recall", "unlearn/measure/metrics.py",
             '["rougeL"].recall', '["rougeL"].fmeasure',
             ("tests/test_official_golden.py", "tests/test_metrics.py")),
    Mutation("ROUGE-L arguments swapped (precision)", "unlearn/measure/metrics.py",
             "_ROUGE.score(expected, generated)", "_ROUGE.score(generated, expected)",
             ("tests/test_official_golden.py", "tests/test_metrics.py")),
    Mutation("target --init ignored (a fresh model trained)", "unlearn/target.py",
             "    if init is not None:\n        return load_model(init)",
             "    if False:\n        return load_model(init)",
             ("tests/test_target.py::test_init_fine_tunes_a_local_model_and_leaves_it_untouched",)),
    Mutation("the oracle memorises forget and retain rows", "unlearn/target.py",
             "memorised = lume.retain if oracle else lume.rows", "memorised = lume.rows",
             ("tests/test_cli.py::test_target_oracle_retrains_the_base_on_the_retain_rows_alone",)),
    Mutation("merge ignores adapter b", "unlearn/methods/merge.py",
             'add_weighted_adapter(["a", "b"], [1.0, 1.0]', 'add_weighted_adapter(["a"], [1.0]',
             ("tests/test_unlearn.py::test_merge_combines_both_adapters_symmetrically",)),
    Mutation("a long document scored on its last window", "unlearn/measure/nll.py",
             "tokenizer(d).input_ids[:window]", "tokenizer(d).input_ids[-window:]",
             ("tests/test_failures.py::test_a_row_far_longer_than_the_window_is_cut_to_fit",)),
    Mutation("GD's retain term with its sign flipped", "unlearn/methods/gd.py",
             "+ self.config.retain_weight * mean_over(out.nll, batch.retain)",
             "- self.config.retain_weight * mean_over(out.nll, batch.retain)",
             ("tests/test_methods.py::test_every_method_forgets_holds_the_retain_set_and_leaves_"
              "the_source[gd]", "tests/test_methods.py::test_ga_and_gd_losses_are_their_formulas")),
    Mutation("NPO's 2/beta weight dropped", "unlearn/methods/losses.py",
             "return -(2 / beta) * F.logsigmoid(-beta * log_ratio)",
             "return -F.logsigmoid(-beta * log_ratio)",
             ("tests/test_methods.py::test_npo_loss_is_its_formula",)),
    Mutation("SHA256's retain weight offset 0.8 -> 0.9", "unlearn/methods/sha256.py",
             "round(0.3 * 6 ** delta + 0.8, 1)", "round(0.3 * 6 ** delta + 0.9, 1)",
             ("tests/test_unlearn.py::test_sha256_retain_weight_follows_the_paper",)),
    Mutation("a refused or failed command leaves its staging directory", "unlearn/io.py",
             "            if not resumable:\n                shutil.rmtree(staging, "
             "ignore_errors=True)\n",
             "            pass\n",
             ("tests/test_outputs.py",)),
    Mutation("the preallocated KV cache one position off", "unlearn/measure/generation.py",
             "next_position = positions[:, -1] + 1", "next_position = positions[:, -1] + 2",
             ("tests/test_architectures.py::test_batched_generation_matches_one_by_one",)),
]


def worktree(tmp: Path) -> Path:
    """A clean detached copy of HEAD (committed files only)."""
    tree = tmp / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), "HEAD"],
                   check=True, capture_output=True)
    return tree


def apply(tree: Path, m: Mutation) -> None:
    path = tree / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"{m.name}: {m.file} holds the replaced text {text.count(m.old)} times "
                         f"(the code moved: update bench/mutations.py)")
    path.write_text(text.replace(m.old, m.new))


def run_tests(tree: Path, m: Mutation) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             "--timeout=900", *m.tests], cwd=tree, capture_output=True,
                            text=True, env={**os.environ, "TQDM_DISABLE": "1",
                                            "PYTHONPATH": str(tree)})
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {**asdict(m), "caught": result.returncode != 0, "pytest_exit": result.returncode,
            "failures": failed[:5], "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated mutation names (default: all)")
    args = p.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = worktree(Path(tmp))
        try:
            for m in chosen:
                apply(tree, m)
                row = run_tests(tree, m)
                subprocess.run(["git", "-C", str(tree), "checkout", "--", m.file], check=True)
                rows.append(row)
                print(f"{'caught' if row['caught'] else 'MISSED':6}  {row['seconds']:6.0f} s  "
                      f"{m.name}: {(row['failures'] or ['(no failure)'])[0]}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False, capture_output=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    (ROOT / "bench" / "results" / "mutations.json").write_text(json.dumps(
        {"commit": commit, "caught": sum(r["caught"] for r in rows), "of": len(rows),
         "mutations": rows}, indent=2))


if __name__ == "__main__":
    main()
