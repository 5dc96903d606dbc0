"""The `report` stage: one page (reports/index.md + .html) over every model, plots, and flat metrics.

Inputs are the other stages' outputs (see `collect`); every missing or inconsistent file raises ArtefactError
naming it. Outputs are byte-stable across re-runs: sorted JSON keys, floats rounded to 6 significant digits,
fixed text formatting, PNGs written by Agg without a Software/date stamp, no timestamps or absolute paths."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from kd.errors import ArtefactError
from kd.io import atomic_path, read_json, read_jsonl, write_json, write_text
from kd.report_plots import ATTN_LABELS, plot_accuracy, plot_attention

EVAL_KEYS = ("accuracy_strict", "accuracy_flexible", "ci95_strict_low", "ci95_strict_high", "ci95_flexible_low",
             "ci95_flexible_high", "correct_strict", "correct_flexible", "n", "mean_response_tokens", "truncated")
TEACHER_KEYS = ("accuracy_strict", "accuracy_flexible", "n", "mean_response_tokens", "finished_fraction")
DISTILL_KEYS = ("final_loss", "final_ce", "final_kd", "steps", "examples", "hard_target")
KINDS = ("strict", "flexible")
# The headline comparison: the final number, however it was written (closest to the paper's hand grading); the
# strict `#### N` match is reported beside it but also measures the answer format.
PRIMARY = "flexible"
TEMPLATES = Path(__file__).parent / "templates"
ARM_TEXT = {"teacher": "the teacher", "student": "base student (no training)",
            "student_cot": "base student, stock zero-shot CoT prompt",
            "finetune": "fine-tune control: CE on gold solutions, no teacher"}
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


def _samples(path: Path, metrics: dict) -> dict[int, dict]:
    rows = read_jsonl(path)
    by_id: dict[int, dict] = {}
    for r in rows:
        _need(path, r, ("id", "correct_strict", "correct_flexible"))
        if r["id"] in by_id:
            raise ArtefactError(f"{path}: duplicate id {r['id']}")
        by_id[r["id"]] = r
    if len(by_id) != metrics["n"]:
        raise ArtefactError(f"{path}: {len(by_id)} rows but its metrics file says n = {metrics['n']}")
    for kind in ("strict", "flexible"):
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
    data: dict[str, Any] = {"models": models, "strategies": strategies, "eval": {}, "samples": {},
                            "teacher": {}, "distill": {}}
    for m in models:
        path = root / "results/eval" / f"{m}.json"
        data["eval"][m] = _need(path, read_json(path), EVAL_KEYS)
        data["samples"][m] = _samples(root / "reports/eval" / m / "samples.jsonl", data["eval"][m])
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


def paired(base: dict[int, dict], other: dict[int, dict], kind: str, names: tuple[str, str]) -> dict:
    """`other` (a trained arm) vs `base` (the base student) on the same questions: c = questions only `other` got
    right, b = only `base`; diff = (c - b) / n; p = exact McNemar; mde = the smallest difference n questions
    detect with 80 % power at two-sided 0.05, at the observed rate of disagreement."""
    from kd.stats import paired_comparison

    if set(base) != set(other):
        only = sorted(set(base) ^ set(other))[:5]
        raise ArtefactError(f"reports/eval/{names[0]} and reports/eval/{names[1]} were evaluated on different "
                            f"questions (ids differ, e.g. {only}); re-run eval for both")
    key = f"correct_{kind}"
    r = paired_comparison({i: bool(other[i][key]) for i in other}, {i: bool(base[i][key]) for i in base})
    return {"b": r["only_b"], "c": r["only_a"], "n": r["n"], "diff": r["difference"], "p": r["mcnemar_p"],
            "mde": r["mde"]}


def holm(pvalues: dict[str, float], alpha: float = 0.05) -> dict[str, bool]:
    """Holm–Bonferroni: which of several tests against the same base reject at family-wise level alpha."""
    order = sorted(pvalues, key=lambda k: (pvalues[k], k))
    out, still = {}, True
    for i, k in enumerate(order):
        still = still and pvalues[k] <= alpha / (len(order) - i)
        out[k] = still
    return out


def verdict(comparisons: dict[str, dict]) -> dict:
    """The headline: a best arm only when its paired test against the base student is significant (Holm-corrected
    over the trained arms, primary metric) and positive; otherwise no detectable difference."""
    if not comparisons:
        return {"best": None, "significant": [], "text": "No trained arm was evaluated."}
    rej = holm({m: c[PRIMARY]["p"] for m, c in comparisons.items()})
    better = [m for m in comparisons if rej[m] and comparisons[m][PRIMARY]["diff"] > 0]
    worse = [m for m in comparisons if rej[m] and comparisons[m][PRIMARY]["diff"] < 0]
    mde = max(c[PRIMARY]["mde"] for c in comparisons.values())
    n = next(iter(comparisons.values()))[PRIMARY]["n"]
    if better:
        best = max(better, key=lambda m: (comparisons[m][PRIMARY]["diff"], -list(comparisons).index(m)))
        text = (f"**{best}** beats the base student on {PRIMARY} accuracy by "
                f"{100 * comparisons[best][PRIMARY]['diff']:+.1f} points (exact McNemar p = "
                f"{pval(comparisons[best][PRIMARY]['p'])}, significant after Holm correction over "
                f"{len(comparisons)} arms).")
    else:
        best = None
        text = (f"No trained arm differs detectably from the base student on {PRIMARY} accuracy: with {n} paired "
                f"questions, differences smaller than about {100 * mde:.0f} points could not have been detected "
                "(80 % power, two-sided 0.05). This is a statement about this sample size, not evidence that "
                "the arms are equal.")
    if worse:
        text += " Significantly worse than the base student: " + ", ".join(f"**{m}**" for m in worse) + "."
    return {"best": best, "significant": better + worse, "text": text}


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
    from kd.arms import BASE_ARM

    comparisons = {m: {k: paired(data["samples"][BASE_ARM], data["samples"][m], k, (BASE_ARM, m)) for k in KINDS}
                   for m in trained_arms(data["strategies"])}
    attention = [{k: num(v) for k, v in r.items()} for r in attention]
    order = {m: i for i, m in enumerate(data["models"])}
    attention.sort(key=lambda r: (order.get(r["model"], len(order)), r["model"], r["layer"]))
    sel = data["selection"]
    if sel is not None and sel.get("profile") != params.get("profile"):
        sel = None  # measured for another profile: not this run's evidence
    return {"params": params, "data": data, "eval": data["eval"], "comparisons": comparisons,
            "verdict": verdict(comparisons), "attention": attention,
            "max_mde": max((c[k]["mde"] for c in comparisons.values() for k in KINDS), default=1.0),
            "attention_means": attention_means(attention), "selection": sel}


def _pp(x: float | None) -> float | None:
    """A fraction as percent, 2 decimals: what the headline metrics show (the details keep full precision)."""
    return None if x is None else round(100 * x, 2)


def headline(an: dict) -> dict[str, dict]:
    """The headline metrics, one small file per (kind, row), each number in exactly one metrics file:
    metrics/<kind>/<arm>.json (eval split: accuracy, Wilson 95 % interval, and for trained arms the paired
    McNemar p against the base student with the smallest difference it could detect) and
    metrics/<kind>/teacher@<strategy>.json (the teacher on the transfer set, what the KD arms learn from).
    Rows share their keys, so `dvc metrics show` is one narrow table (DVC unions the keys of all files into
    columns); percentages, so a one-answer change reads as a few lines in `dvc metrics diff`."""
    from kd.stats import wilson_interval

    out: dict[str, dict] = {}
    for kind in KINDS:
        for m in an["data"]["models"]:
            e = an["eval"][m]
            row = {"acc": _pp(e[f"accuracy_{kind}"]), "lo": _pp(e[f"ci95_{kind}_low"]),
                   "hi": _pp(e[f"ci95_{kind}_high"])}
            if m in an["comparisons"]:
                c = an["comparisons"][m][kind]
                row.update(p=num(round(c["p"], 4)), mde=_pp(c["mde"]))
            out[f"metrics/{kind}/{m}.json"] = row
        for s, t in an["data"]["teacher"].items():
            k = round(t[f"accuracy_{kind}"] * t["n"])
            lo, hi = wilson_interval(k, t["n"])
            out[f"metrics/{kind}/teacher@{s}.json"] = {"acc": _pp(t[f"accuracy_{kind}"]), "lo": _pp(lo),
                                                       "hi": _pp(hi)}
    return out


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
                       pp=lambda x: f"{100 * x:+.1f}")
    text = env.get_template("report.md.j2").render(
        an=an, p=an["params"], data=an["data"], ev=an["eval"], kinds=KINDS, primary=PRIMARY, base=BASE_ARM,
        trained=list(an["comparisons"]), arm_text=ARM_TEXT, cot=COT_PROMPT, remote_code=_remote_code(an["params"]),
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
    """Read inputs under `root`, write reports/{index.md,index.html,attention.json,plots/} and the headline
    metrics/<kind>/*.json (all atomically). Returns the verdict's best arm (None: no significant winner) and them."""
    root = Path(root)
    an = analyse(params, collect(params, root), attention)
    with atomic_path(root / "reports/plots") as tmp:
        tmp.mkdir()
        (tmp / "accuracy.png").write_bytes(plot_accuracy(an))
        if an["attention"]:
            (tmp / "attention.png").write_bytes(plot_attention(an))
    write_json(root / "reports/attention.json", an["attention"])
    write_json(root / "reports/accuracy.json", accuracy_rows(an))
    markdown = render_markdown(an)
    write_text(root / "reports/index.md", markdown)
    write_text(root / "reports/index.html", render_html(markdown))
    h = headline(an)
    for kind in KINDS:  # stale rows (an arm or strategy no longer in the params) must not linger as metrics
        for f in sorted((root / "metrics" / kind).glob("*.json")):
            if f"metrics/{kind}/{f.name}" not in h:
                f.unlink()
    for path, row in h.items():
        write_json(root / path, row)
    return {"best_arm": an["verdict"]["best"], "headline": h}
