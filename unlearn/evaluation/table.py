"""A compact terminal view of evaluation results."""

from __future__ import annotations

from ..measure.official import task_names


def _cell(value: float | None, width: int) -> str:
    """A score, or a dash where the data has no row for it."""
    return f"{'-':>{width}}" if value is None else f"{value:{width}.3f}"


def results_table(results: dict) -> str:
    lines = [f"{'':8} {'task':6} {'regurgitation':>14} {'knowledge':>10}"]
    for split in ("forget", "retain"):
        block = results[f"{split}-set"]
        for task in task_names(block):
            s = block[task]
            lines.append(f"{split:8} {task:6} {_cell(s['regurgitation-score'], 14)} "
                         f"{_cell(s['knowledge-score'], 10)}")
    lines.append(f"task aggregate (harmonic mean of {len(results['aggregated-terms'])} terms): "
                 f"{results['harmonic-mean-task-aggregate']:.3f}")
    if "mia_loss_acc" in results:
        lines.append(f"MIA loss AUC {results['mia_loss_acc']:.3f} -> score "
                     f"{results['mia_final_score']:.3f}")
    if "mmlu_average" in results:
        lines.append(f"MMLU {results['mmlu_average']:.3f}")
    audit = results.get("audit", {})
    if "mia" in audit:
        lines.append("forget-document MIA AUC: " + ", ".join(
            f"{name} {value:.3f}" for name, value in audit["mia"]["auc"].items()))
    if "pii" in audit:
        pii = audit["pii"]
        lines.append(f"PII extraction: {pii['prompts_leaking']}/{pii['prompts']} prompts leak "
                     f"({pii['people_leaking']}/{pii['people']} people)")
    lines.append(f"final score {results['final-score']:.3f} "
                 f"(mean of {', '.join(results['final-score-terms'])})")
    general = results.get("general_text")
    if general:
        lines.append(f"general text: never-seen NLL {general['never_seen_nll']:.3f} against "
                     f"{general['reference_never_seen_nll']:.3f} for {general['reference']}: "
                     f"utility u {general['utility']:.3f}"
                     + (" (DAMAGED)" if general["damaged"] else ""))
    elif "never_seen_nll" in results:
        lines.append(f"general text: never-seen NLL {results['never_seen_nll']:.3f} (no "
                     f"reference model: --reference MODEL gives the utility u)")
    return "\n".join(lines)
