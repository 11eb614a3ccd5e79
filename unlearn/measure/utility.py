"""General-text utility: does a model still read text it never saw as well as a reference does?

LUME's final score cannot see damage to text outside the task: its MIA term is won by raising
the loss of *all* never-seen text, and MMLU, the one general term, is often absent or at chance
(every team on the 1B track scored 0.23-0.27). The utility term sees it. With N the never-seen
documents (the MIA non-members a model is scored on) and NLL̄ the mean over N of each
document's mean per-token NLL,

    u = exp(-max(0, NLL̄_model(N) - NLL̄_reference(N)))

the reference being the oracle where there is one, else the model before unlearning. A model
that reads unseen text as well as the reference has u = 1; every nat of damage divides it by e.
The utility-adjusted share is S = (final score / oracle's final score) × u: the NeurIPS-2023
unlearning challenge's held-out-accuracy factor, with per-token likelihood in its place. A model
with u < 0.75 is flagged: LUME keeps a model whose MMLU stays above 75% of the original's, and
in likelihood that is a rise of ln(4/3) = 0.29 nats.
"""

from __future__ import annotations

import math
from statistics import fmean

DAMAGED_BELOW = 0.75  # u under this: general text damaged (a rise of more than 0.29 nats)


def utility(model_nll: float, reference_nll: float) -> float:
    """u from the two models' mean never-seen NLL; a model below its reference costs nothing."""
    return math.exp(-max(0.0, model_nll - reference_nll))


def general_text(model_nll: list[float], reference_nll: list[float], reference: str) -> dict:
    """The utility entry of an evaluation: both mean NLLs over the same never-seen documents,
    u, and whether the model is flagged as damaged."""
    if len(model_nll) != len(reference_nll) or not model_nll:
        raise ValueError("the utility compares the same never-seen documents under both models")
    mine, theirs = fmean(model_nll), fmean(reference_nll)
    u = utility(mine, theirs)
    return {"never_seen_nll": mine, "reference_never_seen_nll": theirs, "reference": reference,
            "documents": len(model_nll), "utility": u, "damaged": u < DAMAGED_BELOW}


def adjusted_share(final: float, oracle_final: float | None, u: float | None) -> float | None:
    """S = final / oracle's final × u; None without an oracle or a utility."""
    if oracle_final is None or u is None or not oracle_final:
        return None
    return final / oracle_final * u


def damage_note(name: str, model_nll: float, reference_nll: float) -> str:
    """The line a command ends with when a model is flagged."""
    return (f"general text damaged: {name}: never-seen NLL {reference_nll:.1f} -> "
            f"{model_nll:.1f} nats per token (utility {utility(model_nll, reference_nll):.2f}, "
            f"flagged below {DAMAGED_BELOW})")
