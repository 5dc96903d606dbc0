"""The `report` stage: one page (reports/index.md + .html) over every model, plots, and flat metrics.

Inputs are the other stages' outputs (see `collect`); every missing or inconsistent file raises ArtefactError
naming it. Outputs are byte-stable across re-runs: sorted JSON keys, floats rounded to 6 significant digits,
fixed text formatting, PNGs written by Agg without a Software/date stamp, no timestamps or absolute paths."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd.config.arms import resolve, run_name
from kd.core.errors import ArtefactError
from kd.core.io import atomic_path, read_json, read_jsonl, write_json, write_text
from kd.eval.comparisons import (  # noqa: F401
    KINDS,
    compare,
    environment_note,
    fnum,
    nll_change,
    num,
    pct,
    pval,
    sci,
    trained_arms,
    verdict,
)
from kd.report.plots import ATTN_LABELS, plot_accuracy, plot_attention

if TYPE_CHECKING:
    from kd.config.params import Params

EVAL_KEYS = ("accuracy_strict", "accuracy_flexible", "ci95_strict_low", "ci95_strict_high", "ci95_flexible_low",
             "ci95_flexible_high", "correct_strict", "correct_flexible", "n", "mean_response_tokens", "truncated")
TEACHER_KEYS = ("accuracy_strict", "accuracy_flexible", "n", "mean_response_tokens", "finished_fraction")
DISTILL_KEYS = ("final_loss", "final_ce", "final_kd", "steps", "examples", "hard_target")
# The primary metric is named in params before the run (report.primary_metric; default strict, lm-eval's gsm8k
# strict-match, the standard reported number): the conclusion and the best arm use it alone.
TEMPLATES = Path(__file__).parent / "templates"
# keys of results/eval/<arm>.jsonl (the eval stage's per-question rows, committed to git)
QUESTION_KEYS = ("id", "correct_strict", "correct_flexible", "truncated")
# results/distill/<arm>.json keys of the training-effect table (absent in older results: shown as "—")
EFFECT_KEYS = ("update_norm_ratio", "val_nll_before", "val_nll_after")
ATTN_STATS = ("entropy", "entropy_norm", "self_focus", "density", "top5_mass", "similarity")


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


def collect(params: Params, root: str | Path = ".") -> dict:
    """Read every input of the report. Raises ArtefactError naming the first missing/inconsistent file."""
    from kd.config.arms import arm_names

    root = Path(root)
    strategies = list(params.prompting.strategies)
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
        path = root / "results/distill" / f"{run_name(arm)}.json"
        data["distill"][arm] = _need(path, read_json(path), DISTILL_KEYS)
    data["summary"] = read_json(root / "data/prepared/summary.json")
    from kd.core.environment import load_environments, render_table

    envs = load_environments(root)
    data["environment"] = render_table(envs) if envs else None
    data["environment_note"] = environment_note(envs)
    from kd.core.paths import SELECTION_DIR

    prof = params.profile
    sel = root / SELECTION_DIR / f"{prof}.json" if prof and re.fullmatch(r"[a-z][a-z0-9_]{0,63}", prof) else None
    data["selection"] = read_json(sel) if sel is not None and sel.exists() else None
    return data


def read_attention(strategies, root: str | Path = ".") -> list[dict]:
    """Rows {model, layer, <stats>} of every student arm: the attention stages' reports/attention/<arm>.json, joined."""
    from kd.config.arms import student_arms
    from kd.core.paths import ATTENTION_DIR

    rows = []
    for arm in student_arms(strategies):
        path = Path(root) / ATTENTION_DIR / f"{arm}.json"
        layers = read_json(path)
        if not isinstance(layers, list) or not all(isinstance(r, dict) and r.get("model") == arm and "layer" in r
                                                   for r in layers):
            raise ArtefactError(f"{path}: not a list of {arm}'s per-layer rows (re-run its attention stage)")
        rows += layers
    return rows


# ------------------------------------------------------------------------------------------------ analysis


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


def analyse(params: Params, data: dict, attention: list[dict]) -> dict:
    """Everything the page, plots and metrics show, as plain data."""
    primary = params.report.primary_metric
    planning = params.report.planning_disagreement
    fams = compare(params, data)
    attention = [{k: num(v) for k, v in r.items()} for r in attention]
    order = {m: i for i, m in enumerate(data["models"])}
    attention.sort(key=lambda r: (order.get(r["model"], len(order)), r["model"], r["layer"]))
    sel = data["selection"]
    if sel is not None and sel.get("profile") != params.profile:
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
    from kd.eval.stats import wilson_interval

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


def _remote_code(p: Params) -> str:
    """Models load with trust_remote_code=False unless params allow it; the report says which did."""
    on = [role for role, m in (("teacher", p.teacher), ("student", p.student)) if m.trust_remote_code]
    return "off (safetensors weights only, no model code executed)" if not on else \
        f"ON for {' and '.join(on)}: Python code shipped with the model was executed"


def render_markdown(an: dict) -> str:
    import jinja2

    from kd.config.arms import BASE_ARM
    from kd.data.prompting import COT_PROMPT

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters.update(pct=pct, fnum=fnum, pval=pval, cell=lambda s: str(s).replace("|", "\\|").replace("\n", " "),
                       pp=lambda x: f"{100 * x:+.1f}",
                       mde=lambda x: "none" if x is None else f"{100 * x:.1f}", sci=sci)
    env.globals["nll_change"] = nll_change
    text = env.get_template("report.md.j2").render(
        an=an, p=an["params"], data=an["data"], ev=an["eval"], kinds=KINDS, primary=an["primary"], base=BASE_ARM,
        trained=trained_arms(an["data"]["strategies"]),
        arm_text={m: resolve(m, an["data"]["strategies"]).text for m in an["data"]["models"]}, cot=COT_PROMPT,
        remote_code=_remote_code(an["params"]),
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


def write_report(params: Params, attention: list[dict], root: str | Path = ".") -> dict:
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
