"""The `report` stage: one page (reports/index.md + .html) over every model, plots, and flat metrics.

Inputs are the other stages' outputs (see `collect`); every missing or inconsistent file raises ArtefactError
naming it. Outputs are byte-stable across re-runs: sorted JSON keys, floats rounded to 6 significant digits,
fixed text formatting, PNGs written by Agg without a Software/date stamp, no timestamps or absolute paths."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from kd.errors import ArtefactError, KdError
from kd.io import atomic_path, read_json, read_jsonl, write_json, write_text
from kd.report_plots import ATTN_LABELS, plot_accuracy, plot_attention

EVAL_KEYS = ("accuracy_strict", "accuracy_flexible", "ci95_strict_low", "ci95_strict_high", "ci95_flexible_low",
             "ci95_flexible_high", "correct_strict", "correct_flexible", "n", "mean_response_tokens", "truncated")
TEACHER_KEYS = ("accuracy_strict", "accuracy_flexible", "n", "mean_response_tokens", "finished_fraction")
DISTILL_KEYS = ("final_loss", "final_ce", "final_kd", "steps", "examples", "hard_target")
KINDS = ("strict", "flexible")
# The primary metric is named in params before the run (report.primary_metric; default strict, lm-eval's gsm8k
# strict-match, the standard reported number): the conclusion and the best arm use it alone.
TEMPLATES = Path(__file__).parent / "templates"
ARM_TEXT = {"teacher": "the teacher", "student": "base student (no training)",
            "student_cot": "base student, stock zero-shot CoT prompt",
            "finetune": "fine-tune control: CE on gold solutions, no teacher"}
# keys of results/eval/<arm>.jsonl (the eval stage's per-question rows, committed to git)
QUESTION_KEYS = ("id", "correct_strict", "correct_flexible", "truncated")
# results/distill/<arm>.json keys of the training-effect table (absent in older results: shown as "—")
EFFECT_KEYS = ("update_norm_ratio", "val_nll_before", "val_nll_after")
ATTN_STATS = ("entropy", "entropy_norm", "self_focus", "density", "top5_mass", "similarity")


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


# ------------------------------------------------------------------------------------------------ inputs


def _need(path: Path, obj: Any, keys) -> dict:
    if not isinstance(obj, dict):
        raise ArtefactError(f"{path}: expected a JSON object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ArtefactError(f"{path}: missing key(s) {', '.join(missing)} (re-run the stage that writes it)")
    return obj


def _questions(path: Path, metrics: dict) -> dict[int, dict]:
    """results/eval/<arm>.jsonl: one row per question, sorted by id, agreeing with the arm's results/eval/<arm>.json
    counts (the committed per-question record every paired count, interval and p of the report derives from)."""
    if not path.is_file():
        raise ArtefactError(f"{path}: missing (the eval stage writes it; re-run it: `dvc repro`)")
    rows = read_jsonl(path)
    by_id: dict[int, dict] = {}
    for r in rows:
        _need(path, r, QUESTION_KEYS)
        if r["id"] in by_id:
            raise ArtefactError(f"{path}: duplicate id {r['id']}")
        by_id[r["id"]] = r
    if len(by_id) != metrics["n"]:
        raise ArtefactError(f"{path}: {len(by_id)} rows but its metrics file says n = {metrics['n']}")
    for kind in KINDS:
        k = sum(bool(r[f"correct_{kind}"]) for r in rows)
        if k != metrics[f"correct_{kind}"]:
            raise ArtefactError(f"{path}: {k} rows correct_{kind} but its metrics file says "
                                f"{metrics[f'correct_{kind}']} (stale eval output? `dvc repro`)")
    return by_id


def collect(params: dict, root: str | Path = ".") -> dict:
    """Read every input of the report. Raises ArtefactError naming the first missing/inconsistent file."""
    from kd.arms import arm_names

    root = Path(root)
    strategies = list(params["prompting"]["strategies"])
    models = arm_names(strategies)
    data: dict[str, Any] = {"models": models, "strategies": strategies, "eval": {}, "questions": {},
                            "teacher": {}, "distill": {}}
    for m in models:
        path = root / "results/eval" / f"{m}.json"
        data["eval"][m] = _need(path, read_json(path), EVAL_KEYS)
        data["questions"][m] = _questions(root / "results/eval" / f"{m}.jsonl", data["eval"][m])
    for s in strategies:
        path = root / "results/teacher" / f"{s}.json"
        data["teacher"][s] = _need(path, read_json(path), TEACHER_KEYS)
    for arm in trained_arms(strategies):
        name = "finetune" if arm == "finetune" else arm[len("kd-"):]
        path = root / "results/distill" / f"{name}.json"
        data["distill"][arm] = _need(path, read_json(path), DISTILL_KEYS)
    data["summary"] = read_json(root / "data/prepared/summary.json")
    from kd.environment import load_environments, render_table

    envs = load_environments(root)
    data["environment"] = render_table(envs) if envs else None
    data["environment_note"] = environment_note(envs)
    from kd.paths import SELECTION_DIR

    prof = params.get("profile")
    sel = root / SELECTION_DIR / f"{prof}.json" if prof and re.fullmatch(r"[a-z][a-z0-9_]{0,63}", prof) else None
    data["selection"] = read_json(sel) if sel is not None and sel.exists() else None
    return data


def read_attention(strategies, root: str | Path = ".") -> list[dict]:
    """Rows {model, layer, <stats>} of every student arm: the attention stages' reports/attention/<arm>.json, joined."""
    from kd.arms import student_arms
    from kd.paths import ATTENTION_DIR

    rows = []
    for arm in student_arms(strategies):
        path = Path(root) / ATTENTION_DIR / f"{arm}.json"
        layers = read_json(path)
        if not isinstance(layers, list) or not all(isinstance(r, dict) and r.get("model") == arm and "layer" in r
                                                   for r in layers):
            raise ArtefactError(f"{path}: not a list of {arm}'s per-layer rows (re-run its attention stage)")
        rows += layers
    return rows


def trained_arms(strategies) -> list[str]:
    """The arms with an adapter (kd.arms: finetune, kd-<s>), in report order."""
    from kd.arms import arm_names, resolve

    return [a for a in arm_names(strategies) if resolve(a, strategies).trained]


# ------------------------------------------------------------------------------------------------ analysis


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
    """The paper's three comparison families, in reading order; each a list of (arm, reference) pairs (kd.arms).

    priming  every `kd-<s>` vs `kd-none` (s != none): the paper's headline, KD with a priming strategy vs without
    teacher  every `kd-*` vs the fine-tune control: what the teacher adds over training on the same data
    training every trained arm (fine-tune control, kd-*) vs the base student: whether training changed anything
    """
    from kd.arms import BASE_ARM, BASELINES, arm_names, resolve

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
    from kd.stats import mcnemar_mde, paired_comparison

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


def compare(params: dict, data: dict) -> list[dict]:
    """The families with every pair tested per metric and Holm-corrected within its family and metric."""
    from kd.stats import holm

    planning = params["report"]["planning_disagreement"]
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


def attention_means(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """model -> stat -> mean over layers (layers where the stat is defined); models in row order."""
    out: dict[str, dict[str, float | None]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        out[model] = {"layers": len(mrows)}
        for s in ATTN_STATS:
            vals = [r[s] for r in mrows if r.get(s) is not None]
            out[model][s] = sum(vals) / len(vals) if vals else None
    return out


def analyse(params: dict, data: dict, attention: list[dict]) -> dict:
    """Everything the page, plots and metrics show, as plain data."""
    primary = params["report"]["primary_metric"]
    planning = params["report"]["planning_disagreement"]
    fams = compare(params, data)
    attention = [{k: num(v) for k, v in r.items()} for r in attention]
    order = {m: i for i, m in enumerate(data["models"])}
    attention.sort(key=lambda r: (order.get(r["model"], len(order)), r["model"], r["layer"]))
    sel = data["selection"]
    if sel is not None and sel.get("profile") != params.get("profile"):
        sel = None  # measured for another profile: not this run's evidence
    planned = [c[primary]["mde_planning"] for f in fams for c in f["rows"]]
    return {"params": params, "data": data, "eval": data["eval"], "families": fams, "primary": primary,
            "verdict": verdict(fams, primary, planning), "attention": attention,
            "mde_planning": planned[0] if planned else None,
            "attention_means": attention_means(attention), "selection": sel}


def _pp(x: float | None) -> float | None:
    """A fraction as percent, 2 decimals: what the headline metrics show (the details keep full precision)."""
    return None if x is None else round(100 * x, 2)


def _count(questions: dict[int, dict], kind: str) -> tuple[int, int]:
    return sum(bool(r[f"correct_{kind}"]) for r in questions.values()), len(questions)


def headline(an: dict) -> dict[str, dict]:
    """The headline metrics, each number in exactly one small file; percentages, so a one-answer change reads as a
    few lines in `dvc metrics diff`:

    metrics/compare/<family>/<arm>.json  the paper's comparisons first (`dvc metrics show` sorts by path), on the
        primary metric: delta (arm minus its family's reference, kd-none / finetune / student), p_holm (the exact
        McNemar p, Holm-corrected within the family; the raw p is in reports/comparisons.json and on the page),
        mde_obs and mde_plan (smallest detectable difference at the observed and at the planning disagreement;
        null: none). The raw p stays out so that `dvc metrics show` stays within 120 columns.
    metrics/<kind>/<arm>.json  eval split: accuracy with its Wilson 95 % interval, counted from
        results/eval/<arm>.jsonl
    metrics/<kind>/teacher@<s>.json  the teacher on the transfer set, what the KD arms learn from
    Rows share their keys, so `dvc metrics show` stays one narrow table (DVC unions the keys of all files)."""
    from kd.stats import wilson_interval

    primary = an["primary"]
    out: dict[str, dict] = {}
    for fam in an["families"]:
        for c in fam["rows"]:
            r = c[primary]
            out[f"metrics/compare/{fam['key']}/{c['arm']}.json"] = {
                "delta": _pp(r["diff"]), "p_holm": num(round(r["p_holm"], 4)),
                "mde_obs": _pp(r["mde_observed"]), "mde_plan": _pp(r["mde_planning"])}
    for kind in KINDS:
        for m in an["data"]["models"]:
            k, n = _count(an["data"]["questions"][m], kind)
            lo, hi = wilson_interval(k, n)
            out[f"metrics/{kind}/{m}.json"] = {"acc": _pp(k / n), "lo": _pp(lo), "hi": _pp(hi)}
        for s, t in an["data"]["teacher"].items():
            k = round(t[f"accuracy_{kind}"] * t["n"])
            lo, hi = wilson_interval(k, t["n"])
            out[f"metrics/{kind}/teacher@{s}.json"] = {"acc": _pp(t[f"accuracy_{kind}"]), "lo": _pp(lo),
                                                       "hi": _pp(hi)}
    return out


def comparison_rows(an: dict) -> list[dict]:
    """reports/comparisons.json: every paired comparison, both metrics, with its counts (the page's tables)."""
    return [{"family": fam["key"], "arm": c["arm"], "ref": c["ref"], "metric": k,
             **{key: num(v) for key, v in c[k].items()}}
            for fam in an["families"] for c in fam["rows"] for k in KINDS]


def accuracy_rows(an: dict) -> list[dict]:
    """reports/accuracy.json: accuracy per arm with its interval, for `dvc plots`."""
    ev = an["eval"]
    return [{"model": m, "metric": kind, "accuracy": num(ev[m][f"accuracy_{kind}"]),
             "ci95_low": num(ev[m][f"ci95_{kind}_low"]), "ci95_high": num(ev[m][f"ci95_{kind}_high"]),
             "n": ev[m]["n"]} for m in an["data"]["models"] for kind in KINDS]


# ------------------------------------------------------------------------------------------------ page


def _remote_code(p: dict) -> str:
    """Models load with trust_remote_code=False unless params allow it; the report says which did."""
    on = [role for role in ("teacher", "student") if p[role].get("trust_remote_code")]
    return "off (safetensors weights only, no model code executed)" if not on else \
        f"ON for {' and '.join(on)}: Python code shipped with the model was executed"


def render_markdown(an: dict) -> str:
    import jinja2

    from kd.arms import BASE_ARM
    from kd.prompting import COT_PROMPT

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters.update(pct=pct, fnum=fnum, pval=pval, cell=lambda s: str(s).replace("|", "\\|").replace("\n", " "),
                       pp=lambda x: f"{100 * x:+.1f}",
                       mde=lambda x: "none" if x is None else f"{100 * x:.1f}", sci=sci)
    env.globals["nll_change"] = nll_change
    text = env.get_template("report.md.j2").render(
        an=an, p=an["params"], data=an["data"], ev=an["eval"], kinds=KINDS, primary=an["primary"], base=BASE_ARM,
        trained=trained_arms(an["data"]["strategies"]), arm_text=ARM_TEXT, cot=COT_PROMPT, remote_code=_remote_code(an["params"]),
        attn_stats=ATTN_STATS, attn_labels=ATTN_LABELS)
    return text.rstrip("\n") + "\n"


def render_html(markdown: str) -> str:
    """The same page as HTML: markdown-it (CommonMark + tables), in a small static shell."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    css = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
           "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
           "img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>kd-prime report</title>\n"
            f"<style>{css}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


# ------------------------------------------------------------------------------------------------ stage


def write_report(params: dict, attention: list[dict], root: str | Path = ".") -> dict:
    """Read inputs under `root`, write reports/{index.md,index.html,attention.json,accuracy.json,comparisons.json,
    plots/} and the headline metrics/{compare,strict,flexible}/ (all atomically). Returns the verdict's best arm (None: no significant winner) and them."""
    root = Path(root)
    an = analyse(params, collect(params, root), attention)
    with atomic_path(root / "reports/plots") as tmp:
        tmp.mkdir()
        (tmp / "accuracy.png").write_bytes(plot_accuracy(an))
        if an["attention"]:
            (tmp / "attention.png").write_bytes(plot_attention(an))
    write_json(root / "reports/attention.json", an["attention"])
    write_json(root / "reports/accuracy.json", accuracy_rows(an))
    write_json(root / "reports/comparisons.json", comparison_rows(an))
    markdown = render_markdown(an)
    write_text(root / "reports/index.md", markdown)
    write_text(root / "reports/index.html", render_html(markdown))
    h = headline(an)
    for sub in (*KINDS, "compare"):  # stale rows (an arm or strategy no longer in the params) must not linger
        for f in sorted((root / "metrics" / sub).rglob("*.json")):
            if f.relative_to(root).as_posix() not in h:
                f.unlink()
    for path, row in h.items():
        write_json(root / path, row)
    return {"best_arm": an["verdict"]["best"], "headline": h}


# ------------------------------------------------------------------------------------------------ planning


def measured_disagreement(params: dict, root: str | Path = ".") -> tuple[float, str] | None:
    """The largest disagreement (share of questions one arm got right and the other wrong, primary metric) among
    the first comparison family whose committed results/eval/<arm>.jsonl files all exist, and what it was measured
    on; None when no family has them. The largest, so the questions planned on it suffice for every pair."""
    from kd.stats import paired_comparison

    root = Path(root)
    primary = params["report"]["primary_metric"]
    key = f"correct_{primary}"
    for fam in families(params["prompting"]["strategies"]):
        arms = list(dict.fromkeys(a for pair in fam["pairs"] for a in pair))
        if not arms or not all((root / "results/eval" / f"{a}.jsonl").is_file() for a in arms):
            continue
        rows = {a: {r["id"]: bool(r[key]) for r in read_jsonl(root / "results/eval" / f"{a}.jsonl")} for a in arms}
        best = None
        for a, ref in fam["pairs"]:
            if set(rows[a]) != set(rows[ref]) or not rows[a]:
                raise ArtefactError(f"results/eval/{a}.jsonl and results/eval/{ref}.jsonl hold different questions; "
                                    "re-run eval for both")
            r = paired_comparison(rows[a], rows[ref])
            d = (r["only_a"] + r["only_b"]) / r["n"]
            if best is None or d > best[0]:
                best = (d, f"{a} vs {ref}, {primary}, {r['n']} questions in results/eval/")
        return best
    return None


def seconds_per_question(params: dict, root: str | Path = ".") -> tuple[dict[str, float], str]:
    """Seconds one eval question takes per arm on this machine: results/eval/<arm>.json's `seconds` / `n` where the
    eval stage recorded its time, else reports/bench.json's decoding speed (`kd bench`, tokens/s of the teacher's or
    the student's model) over the arm's mean response tokens. Returns ({arm: seconds}, where they came from)."""
    from kd.arms import arm_names, resolve

    root = Path(root)
    strategies = params["prompting"]["strategies"]
    out, sources = {}, set()
    bench_path = root / "reports/bench.json"
    bench = read_json(bench_path) if bench_path.is_file() else {}
    for arm in arm_names(strategies):
        path = root / "results/eval" / f"{arm}.json"
        if not path.is_file():
            continue
        e = read_json(path)
        if isinstance(e.get("seconds"), (int, float)) and e.get("n"):
            out[arm] = float(e["seconds"]) / e["n"]
            sources.add("results/eval/<arm>.json seconds / n")
            continue
        speed = (((bench.get("models") or {}).get(resolve(arm, strategies).role) or {}).get("2_decoder") or {})
        tps = (speed.get("tokens_per_s") or {}).get("ours")
        if tps and e.get("mean_response_tokens"):
            out[arm] = float(e["mean_response_tokens"]) / float(tps)
            sources.add("reports/bench.json decoding tokens/s (kd bench) over results/eval/<arm>.json "
                        "mean_response_tokens")
    return out, "; ".join(sorted(sources))


def plan(params: dict, mde: float, disagreement: float | None = None, root: str | Path = ".",
         seconds: float | None = None) -> list[str]:
    """`kd plan`: how many paired eval questions a detectable difference `mde` (a fraction) needs at 80 % power and
    two-sided 0.05 (exact McNemar), and what evaluating them costs here. The disagreement: the given one, else the
    committed results' measured one (measured_disagreement), else report.planning_disagreement."""
    from kd.stats import mcnemar_sample_size

    if disagreement is not None:
        where = "given (--disagreement)"
    else:
        measured = measured_disagreement(params, root)
        if measured is not None and measured[0] > 0:
            disagreement, where = measured[0], f"measured: the largest of the committed results ({measured[1]})"
        else:
            disagreement = params["report"]["planning_disagreement"]
            where = "report.planning_disagreement (no committed per-question results to measure it on)"
    if not 0 < disagreement <= 1:
        raise KdError(f"kd plan: the disagreement must be in (0, 1], got {disagreement}")
    if not 0 < mde <= disagreement:
        raise KdError(f"kd plan: a difference of {100 * mde:.1f} points needs the two arms to disagree on at least "
                      f"that share of the questions, but the disagreement is {100 * disagreement:.1f} % ({where}); "
                      "pass a --mde up to it or a larger --disagreement")
    n = mcnemar_sample_size(mde, disagreement)
    lines = [f"detecting {100 * mde:.1f} points (exact McNemar, two-sided 0.05, 80 % power) at "
             f"{100 * disagreement:.1f} % disagreement [{where}] needs {n} paired eval questions "
             f"(prepare.eval_size is {params['prepare']['eval_size']})."]
    if seconds is not None:
        per, source = {"every arm": float(seconds)}, "given (--seconds-per-question)"
    else:
        per, source = seconds_per_question(params, root)
    if not per:
        lines.append("cost: unknown here (no results/eval/<arm>.json with `seconds`, no reports/bench.json); pass "
                     "--seconds-per-question.")
        return lines
    from kd.arms import arm_names

    arms = len(arm_names(params["prompting"]["strategies"]))
    total = sum(per.values()) * n * (arms if "every arm" in per else 1)
    each = ", ".join(f"{a} {s:.2f} s" for a, s in per.items())
    lines.append(f"cost on this machine: about {total / 3600:.1f} h of eval decoding for {n} questions "
                 f"({each} per question; from {source}"
                 + (f"; {arms} arms" if "every arm" in per else f"; arms: {', '.join(per)}") + "). "
                 "The teacher, logits and distill stages do not grow with the eval questions.")
    return lines
