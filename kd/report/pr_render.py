"""`kd pr-report`'s Markdown (kd.report.pr gathers the data): summary, params, stages, accuracy per arm with the
paired test across the two commits, teacher per strategy, loss plot, environment."""

from __future__ import annotations

import json
from typing import Any

from kd.report.pr import ALPHA, EVAL_DIR, MAX_IDS


def _v(x: Any) -> str:
    if x is None:
        return "—"
    s = json.dumps(x, sort_keys=True, ensure_ascii=False) if not isinstance(x, str) else x
    s = s.replace("|", "\\|").replace("\n", " ")
    return f"`{s}`" if len(s) <= 60 else f"`{s[:57]}...`"


def _pct(a: dict | None) -> str:
    return "—" if a is None else f"{100 * a['acc']:.1f} % [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}] ({a['k']}/{a['n']})"


def _ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:MAX_IDS])
    return shown + (f", … ({len(ids)} in all)" if len(ids) > MAX_IDS else "")


def _mde(p: dict) -> str:
    """The smallest detectable difference at the disagreement the two commits showed (kd.eval.stats.mcnemar_mde, no
    best-case floor); "none" where no difference is detectable at that disagreement (too few questions changed)."""
    return "none" if p["mde"] is None else f"±{100 * p['mde']:.1f}"


def _stage_list(stages: list[str]) -> str:
    return ", ".join(f"`{s}`" for s in stages) if stages else "none"


def _summary(an: dict) -> list[str]:
    """Which arms moved beyond noise on the headline metric, and which arms' eval re-ran."""
    arms = an["arms"]
    L: list[str] = []
    paired = [a for a in arms if a.get("paired")]
    moved = [a["arm"] for a in paired if a["beyond_noise"]]
    if moved:
        L.append(f"**Beyond noise** ({ALPHA:g} two-sided, exact McNemar, Holm-corrected over {len(paired)} arms, "
                 f"{an['kinds'][0]} accuracy, `report.primary_metric`): {', '.join(f'**{m}**' for m in moved)}.")
    elif paired:
        L.append(f"**No arm's accuracy changed beyond noise** (exact McNemar on the shared questions, {ALPHA:g} "
                 f"two-sided, Holm-corrected over {len(paired)} arms, {an['kinds'][0]} accuracy, "
                 "`report.primary_metric`).")
    else:
        L.append("**No arm has per-question results at both commits**: no paired test was possible "
                 f"(the eval stages write `{EVAL_DIR}/<arm>.jsonl`; re-run and commit them).")
    reran_arms = [a["arm"] for a in arms if a["reran"]]
    L.append(f"Arms whose eval re-ran: {', '.join(f'`{a}`' for a in reran_arms) or 'none'}.")
    L.append("")
    return L


def _params(an: dict) -> list[str]:
    """The params that differ between the two commits."""
    base, head = an["base"], an["head"]
    L: list[str] = []
    L += ["## Params changed", ""]
    if an["params"]:
        L += ["| param | " + f"{base.name} | {head.name} |", "|---|---|---|"]
        L += [f"| `{k}` | {_v(a)} | {_v(b)} |" for k, a, b in an["params"]]
    else:
        L.append("No param changed (params.yaml, strategies.yaml).")
    L.append("")
    return L


def _stages(an: dict) -> list[str]:
    """Which stages re-ran (dvc.lock), and a lock that is stale against its own params."""
    base, head, ch = an["base"], an["head"], an["stages"]
    L: list[str] = []
    L += ["## Stages (dvc.lock)", ""]
    if not any(an["has_lock"]):
        L.append("Neither commit has a dvc.lock: nothing has been run and committed.")
    else:
        L.append(f"- re-ran (lock entry changed): {_stage_list(ch['reran'])}")
        if ch["added"]:
            L.append(f"- added: {_stage_list(ch['added'])}")
        if ch["removed"]:
            L.append(f"- removed: {_stage_list(ch['removed'])}")
        L.append(f"- unchanged: {len(ch['unchanged'])} stage(s)")
    for side, rev in (("base", base), ("head", head)):
        stale = an["stale"][side]
        if stale:
            stages = sorted({s for s, *_ in stale})
            s, k, locked, now = stale[0]
            L.append(f"- **{rev.name}'s dvc.lock is stale**: {len(stages)} stage(s) ran with other params than "
                     f"{rev.name} commits (e.g. `{s}`: `{k}` = {_v(locked)} in the lock, {_v(now)} in params). "
                     "Its results are not the results of its params: run `dvc repro` and commit.")
    L.append("")
    return L


def _accuracy(an: dict) -> list[str]:
    """Accuracy per arm and metric at both commits, the paired test and what it can detect."""
    from kd.eval.comparisons import pval

    base, head, arms = an["base"], an["head"], an["arms"]
    L: list[str] = []
    L += ["## Accuracy per arm", "",
          "95 % Wilson intervals. The test pairs the two commits on the questions both scored (exact McNemar: the "
          "questions one commit got right and the other wrong); *detectable* is the smallest change those "
          "questions detect with 80 % power at two-sided 0.05, at the disagreement observed between the two "
          "commits (none: at that disagreement no change is detectable). A change smaller than that is not "
          "evidence either way.", ""]
    for kind in an["kinds"]:
        L += [f"### {kind} {'(the headline)' if kind == an['kinds'][0] else ''}".rstrip(), "",
              f"| arm | {base.name} | {head.name} | Δ (pp) | shared | right only in {base.name} / {head.name} "
              "| p (McNemar) | detectable Δ (pp) | beyond noise | eval re-ran |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for a in arms:
            acc_a, acc_b = a["acc"][kind]
            delta = "—" if acc_a is None or acc_b is None else f"{100 * (acc_b['acc'] - acc_a['acc']):+.1f}"
            p = a.get("paired", {}).get(kind)
            if p is not None:
                test = (f"{p['n']} | {p['only_b']} / {p['only_a']} | {pval(p['mcnemar_p'])} | {_mde(p)} | "
                        + ("—" if kind != an["kinds"][0] else ("yes" if a["beyond_noise"] else "no")))
            else:
                test = "— | — | — | — | —"
            L.append(f"| {a['arm']} | {_pct(acc_a)} | {_pct(acc_b)} | {delta} | {test} | "
                     f"{'yes' if a['reran'] else 'no'} |")
        L.append("")
    return L


def _notes(an: dict) -> list[str]:
    """Per arm, in words: new or removed arms, missing per-question results, unshared questions."""
    base, head, arms = an["base"], an["head"], an["arms"]
    L: list[str] = []
    for a in arms:
        if not a["in_base"]:
            L.append(f"- `{a['arm']}`: new at {head.name} (no result at {base.name}).")
        elif not a["in_head"]:
            L.append(f"- `{a['arm']}`: removed at {head.name} (only {base.name} has it).")
        elif not a["per_question"]:
            missing = [r.name for r, q in ((base, f"{EVAL_DIR}/{a['arm']}.jsonl"), (head, f"{EVAL_DIR}/{a['arm']}.jsonl"))
                       if q not in r.files]
            L.append(f"- `{a['arm']}`: no per-question results at {' and '.join(missing)} "
                         f"(`{EVAL_DIR}/{a['arm']}.jsonl`): accuracies from `{EVAL_DIR}/{a['arm']}.json`, no paired test.")
        if a.get("only_base") or a.get("only_head"):
            parts = []
            if a["only_base"]:
                parts.append(f"{len(a['only_base'])} only at {base.name} (ids {_ids(a['only_base'])})")
            if a["only_head"]:
                parts.append(f"{len(a['only_head'])} only at {head.name} (ids {_ids(a['only_head'])})")
            L.append(f"- `{a['arm']}`: questions not scored by both commits: {'; '.join(parts)}. The accuracies "
                         "above are over each commit's own questions; the test uses only the shared ones.")
        if a.get("per_question") and a["reran"] and not a.get("answers_changed") and a.get("shared"):
            L.append(f"- `{a['arm']}`: re-ran, and every shared question's answer is the same.")
        elif a.get("answers_changed"):
            L.append(f"- `{a['arm']}`: {a['answers_changed']} of {a['shared']} shared questions answered "
                         "differently (extracted answer, tokens or truncation).")
    return L


def _teacher(an: dict) -> list[str]:
    """The teacher per strategy on the transfer questions, at both commits."""
    base, head = an["base"], an["head"]
    L: list[str] = []
    ta, tb = an["teacher"]
    if ta or tb:
        L += ["## The teacher per strategy (transfer questions: what the KD arms learn from)", "",
              f"| strategy | strict {base.name} | strict {head.name} | flexible {base.name} | flexible {head.name} "
              f"| finished {base.name} | finished {head.name} |", "|---|---|---|---|---|---|---|"]
        for s in sorted(set(ta) | set(tb), key=lambda s: (s not in tb, s)):
            cells = []
            for key in ("accuracy_strict", "accuracy_flexible", "finished_fraction"):
                for t in (ta.get(s), tb.get(s)):
                    v = t.get(key) if isinstance(t, dict) else None
                    cells.append("—" if not isinstance(v, (int, float)) else f"{100 * v:.1f} %")
            L.append(f"| {s} | " + " | ".join(cells) + " |")
        L.append("")
    return L


def _environment(an: dict) -> list[str]:
    """Each commit's environment fingerprint and, in words, what a change of machine means."""
    base, head = an["base"], an["head"]
    L: list[str] = []
    ea, eb = an["env"]
    L += ["## Environment", "", f"- {base.name}: fingerprint `{ea['headline'] or 'none recorded'}`",
          f"- {head.name}: fingerprint `{eb['headline'] or 'none recorded'}`", ""]
    if ea["headline"] and eb["headline"] and ea["headline"] != eb["headline"]:
        differ = sorted(s for s in set(ea["stages"]) & set(eb["stages"]) if ea["stages"][s] != eb["stages"][s])
        L.append("**The environment changed between the two commits** (CPU/ISA, threads, package versions or math "
                 "settings): a difference above may come from the machine, not from the change. Stages whose "
                 f"fingerprint differs: {_stage_list(differ)}. Re-run both commits on one machine to separate "
                 "the two (`kd verify --committed` measures the drift).")
    elif ea["headline"] == "mixed" or eb["headline"] == "mixed":
        L.append("At least one commit's stages ran in different environments (`mixed`): compare within one.")
    elif ea["headline"] and ea["headline"] == eb["headline"]:
        L.append("Same environment at both commits: a difference above is not the machine's.")
    else:
        L.append("No environment recorded at one of the commits: cannot tell whether the machine changed.")
    return L


def render(an: dict, plots: dict[str, str]) -> str:
    base, head = an["base"], an["head"]
    L = [f"# kd-prime: {head.name} (`{head.short}`) vs {base.name} (`{base.short}`)", ""]
    L += ["Built from what git holds at the two commits (`kd pr-report`): no model was run for this report.", ""]
    L += _summary(an) + _params(an) + _stages(an) + _accuracy(an)
    notes = _notes(an)
    L += notes + [""] if notes else []
    if "accuracy" in plots:
        L += [f"![accuracy per arm at both commits]({plots['accuracy']})", ""]
    L += _teacher(an)
    if "loss" in plots:
        L += ["## Training loss", "", f"![training loss at both commits]({plots['loss']})", ""]
    L += _environment(an)
    return "\n".join(L).rstrip("\n") + "\n"
