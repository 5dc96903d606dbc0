"""The report's paired comparisons: the paper's three families of arms (kd-<s> vs kd-none, kd-* vs finetune, trained
arms vs the base student), each pair an exact McNemar test on the same questions with Holm's correction within the
family, the honest smallest detectable difference, the conclusion in words, and the note on mixed environments.
kd/report/page.py reads the inputs and renders; docs/comparisons.md explains the choices."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kd.core.errors import ArtefactError

if TYPE_CHECKING:
    from kd.config.params import Params

KINDS = ("strict", "flexible")


def environment_note(envs: dict[str, dict]) -> str | None:
    """In words, when the stages ran in more than one environment (metrics/environment.json says `mixed`): which
    stages ran where. None when every stage shares one fingerprint (or none was recorded)."""
    groups: dict[str, list[str]] = {}
    for stage, e in sorted(envs.items()):
        groups.setdefault(e["fingerprint"], []).append(stage)
    if len(groups) < 2:
        return None
    parts = "; ".join(f"`{fp}`: {', '.join(stages)}" for fp, stages in groups.items())
    return (f"The stages of this run ran in {len(groups)} different environments (the environment fingerprint is "
            f"`mixed`; a stage whose inputs did not change keeps the outputs it made elsewhere): {parts}. Numbers from "
            "different environments agree within their intervals, not bit for bit; re-run the stages on one "
            "machine (`dvc repro --force`) for a run from a single environment.")


def families(strategies) -> list[dict]:
    """The paper's three comparison families, in reading order; each a list of (arm, reference) pairs (kd.config.arms).

    priming  every `kd-<s>` vs `kd-none` (s != none): the paper's headline, KD with a priming strategy vs without
    teacher  every `kd-*` vs the fine-tune control: what the teacher adds over training on the same data
    training every trained arm (fine-tune control, kd-*) vs the base student: whether training changed anything
    """
    from kd.config.arms import BASE_ARM, BASELINES, arm_names, resolve

    arms = arm_names(strategies)
    kd = [a for a in arms if a not in BASELINES]                            # one per strategy, in its order
    control = [a for a in BASELINES if resolve(a, strategies).trained]      # the fine-tune control
    trained = trained_arms(strategies)
    if "none" in strategies:
        plain = kd[list(strategies).index("none")]
        priming = [(a, plain) for a in kd if a != plain]
        why = None if priming else (f"`none` is the only strategy (prompting.strategies), so there is no primed KD arm "
                                    f"to compare with {plain}.")
    else:
        priming, why = [], ("`none` is not among prompting.strategies, so there is no KD-without-priming arm "
                            "(`kd-none`) to compare the primed arms with; add `none` to run the paper's comparison.")
    return [
        {"key": "priming", "title": "KD with a priming strategy vs KD without (the paper's comparison)",
         "pairs": priming, "empty": why},
        {"key": "teacher", "title": "KD vs the fine-tune control (the teacher's contribution)",
         "pairs": [(a, c) for a in kd for c in control],
         "empty": None if control else "no fine-tune control among the arms."},
        {"key": "training", "title": "Trained arms vs the base student (did training change the answers?)",
         "pairs": [(a, BASE_ARM) for a in trained], "empty": None},
    ]


def paired(questions: dict[str, dict[int, dict]], arm: str, ref: str, kind: str, planning: float) -> dict:
    """`arm` vs `ref` on the same questions (results/eval/<arm>.jsonl): gained = questions only `arm` got right,
    lost = only `ref`; diff = (gained - lost) / n; p = exact two-sided McNemar; mde_observed = the smallest
    difference n questions detect with 80 % power at two-sided 0.05 at the observed disagreement (None: none at
    that disagreement), mde_planning = the same at report.planning_disagreement."""
    from kd.eval.stats import mcnemar_mde, paired_comparison

    a, b = questions[arm], questions[ref]
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:5]
        raise ArtefactError(f"results/eval/{ref}.jsonl and results/eval/{arm}.jsonl were evaluated on different "
                            f"questions (ids differ, e.g. {only}); re-run eval for both")
    key = f"correct_{kind}"
    r = paired_comparison({i: bool(a[i][key]) for i in a}, {i: bool(b[i][key]) for i in b})
    return {"n": r["n"], "gained": r["only_a"], "lost": r["only_b"], "diff": r["difference"], "p": r["mcnemar_p"],
            "disagreement": (r["only_a"] + r["only_b"]) / r["n"], "mde_observed": r["mde"],
            "mde_planning": mcnemar_mde(r["n"], planning)}


def compare(params: Params, data: dict) -> list[dict]:
    """The families with every pair tested per metric and Holm-corrected within its family and metric."""
    from kd.eval.stats import holm

    planning = params.report.planning_disagreement
    out = []
    for fam in families(data["strategies"]):
        rows = [{"arm": a, "ref": r, **{k: paired(data["questions"], a, r, k, planning) for k in KINDS}}
                for a, r in fam["pairs"]]
        for k in KINDS:
            adj = holm({f"{c['arm']}--{c['ref']}": c[k]["p"] for c in rows})
            for c in rows:
                c[k]["p_holm"] = adj[f"{c['arm']}--{c['ref']}"]
        out.append({**fam, "rows": rows})
    return out


def _family_sentence(fam: dict, primary: str, alpha: float = 0.05) -> str:
    rows = fam["rows"]
    if not rows:
        return fam["empty"] or "nothing to compare."
    ref = dict.fromkeys(c["ref"] for c in rows)
    sig = [c for c in rows if c[primary]["p_holm"] <= alpha]
    n = rows[0][primary]["n"]
    if not sig:
        return (f"no arm differs detectably from {' / '.join(ref)} on {primary} accuracy ({len(rows)} paired "
                f"comparison(s) of {n} questions, Holm-corrected).")
    return "; ".join(f"**{c['arm']}** is {'better' if c[primary]['diff'] > 0 else 'worse'} than {c['ref']} by "
                     f"{100 * abs(c[primary]['diff']):.1f} points on {primary} accuracy (exact McNemar p = "
                     f"{pval(c[primary]['p'])}, Holm-corrected p = {pval(c[primary]['p_holm'])} over "
                     f"{len(rows)} comparison(s))" for c in sig) + "."


def power_text(fams: list[dict], primary: str, planning: float) -> str:
    """What this sample could and could not have detected, in words (the first family with comparisons)."""
    fam = next((f for f in fams if f["rows"]), None)
    if fam is None:
        return ""
    rows = fam["rows"]
    n = rows[0][primary]["n"]
    plan = rows[0][primary]["mde_planning"]
    lo = min(c[primary]["disagreement"] for c in rows)
    hi = max(c[primary]["disagreement"] for c in rows)
    span = pct(lo) if lo == hi else f"{pct(lo)}–{pct(hi)}"
    seen = [c[primary]["mde_observed"] for c in rows]
    pairs = ", ".join(f"{c['arm']} vs {c['ref']}" for c in rows)
    if all(m is None for m in seen):
        obs = (f"at the disagreement observed ({span} of questions answered right by one arm only), "
               "no difference is detectable: a difference can be no larger than the disagreement, and differences "
               "that small are below what these questions resolve")
    else:
        known = [m for m in seen if m is not None]
        a, b = 100 * min(known), 100 * max(known)
        obs = (f"at the disagreement observed ({span} of questions answered right by one arm only) the "
               f"smallest detectable difference is {f'{a:.1f}' if a == b else f'{a:.1f}–{b:.1f}'} points"
               + ("" if len(known) == len(seen) else " (none detectable where the arms disagree less)"))
    planned = (f"at the planning disagreement of {pct(planning, 0)} (`report.planning_disagreement`) it is "
               f"{100 * plan:.1f} points" if plan is not None else
               f"at the planning disagreement of {pct(planning, 0)} no difference is detectable")
    return (f"**What this sample could detect** ({fam['key']} family: {pairs}): with {n} paired questions, 80 % power "
            f"and two-sided 0.05, {obs}; {planned}. Differences smaller than these could not have been detected "
            "here: a comparison without a significant result is a statement about this sample size, not evidence "
            "that the arms are equal. `kd plan --mde <points>` says how many questions a smaller difference needs.")


def verdict(fams: list[dict], primary: str, planning: float) -> dict:
    """The headline, on the primary metric only: each family's significant differences after Holm; the best arm
    only when its paired test against the base student is significant (Holm, training family) and positive."""
    by = {f["key"]: f for f in fams}
    training = by["training"]["rows"]
    if not training:
        return {"best": None, "significant": [], "text": "No trained arm was evaluated.", "families": {}}
    sig = {f["key"]: [c["arm"] for c in f["rows"] if c[primary]["p_holm"] <= 0.05] for f in fams}
    better = [c for c in training if c[primary]["p_holm"] <= 0.05 and c[primary]["diff"] > 0]
    best = max(better, key=lambda c: (c[primary]["diff"], -training.index(c)))["arm"] if better else None
    lines = [f"Primary metric, named in params before the run: **{primary}** accuracy "
             f"(`report.primary_metric`); every statement below uses it alone.", ""]
    for f in fams:
        lines.append(f"- **{f['title']}**: {_family_sentence(f, primary)}")
    lines.append("")
    if best:
        c = next(c for c in training if c["arm"] == best)
        lines.append(f"Best arm: **{best}**, {100 * c[primary]['diff']:+.1f} points over the base student "
                     f"(Holm-corrected p = {pval(c[primary]['p_holm'])}): the largest significant gain over the base "
                     "student; whether it beats the other trained arms is the families' question above.")
    else:
        lines.append("No best arm is named: no trained arm beats the base student significantly after Holm "
                     "correction.")
    text = power_text(fams, primary, planning)
    if text:
        lines += ["", text]
    return {"best": best, "significant": [a for a in sig["training"]], "text": "\n".join(lines), "families": sig}


# ------------------------------------------------------------------------------------------------ numbers


def num(x: Any) -> Any:
    """Round floats to 6 significant digits (byte-stable JSON); ints, strings and None pass through."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f} %"


def fnum(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def sci(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def nll_change(r: dict) -> str:
    """results/distill/<arm>.json: validation NLL after minus before (absent in older results: "—")."""
    a, b = r.get("val_nll_after"), r.get("val_nll_before")
    return "—" if a is None or b is None else f"{a - b:+.4f}"


def pval(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def trained_arms(strategies) -> list[str]:
    """The arms with an adapter (kd.config.arms: finetune, kd-<s>), in report order."""
    from kd.config.arms import arm_names, resolve

    return [a for a in arm_names(strategies) if resolve(a, strategies).trained]
