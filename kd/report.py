"""The `report` stage: one page (reports/index.md + .html) over every model, plots, and flat metrics.

Inputs are the other stages' outputs (see `collect`); every missing or inconsistent file raises ArtefactError
naming it. Outputs are byte-stable across re-runs: sorted JSON keys, floats rounded to 6 significant digits,
fixed text formatting, PNGs written by Agg without a Software/date stamp, no timestamps or absolute paths."""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

from kd.errors import ArtefactError
from kd.io import atomic_path, read_json, read_jsonl, write_json, write_text

EVAL_KEYS = ("accuracy_strict", "accuracy_flexible", "ci95_strict_low", "ci95_strict_high", "ci95_flexible_low",
             "ci95_flexible_high", "correct_strict", "correct_flexible", "n", "mean_response_tokens")
TEACHER_KEYS = ("accuracy_strict", "accuracy_flexible", "n", "mean_response_tokens")
DISTILL_KEYS = ("final_loss", "final_ce", "final_kd", "steps", "examples")
ATTN_STATS = ("entropy", "entropy_norm", "self_focus", "density", "top5_mass", "similarity")
ATTN_LABELS = {"entropy": "entropy (nats)", "entropy_norm": "entropy / log(allowed keys)",
               "self_focus": "self-focus (diagonal weight)", "density": "density (allowed weights > 0.1)",
               "top5_mass": "top-5 key mass", "similarity": "similarity to layer l-1 (cosine)"}
PLOT_STATS = ("entropy_norm", "self_focus", "density", "similarity")
PNG_DPI = 100


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
    root = Path(root)
    models = list(params["eval"]["models"])
    strategies = list(params["prompting"]["strategies"])
    data: dict[str, Any] = {"models": models, "strategies": strategies, "eval": {}, "samples": {},
                            "teacher": {}, "distill": {}}
    for m in models:
        path = root / "metrics/eval" / f"{m}.json"
        data["eval"][m] = _need(path, read_json(path), EVAL_KEYS)
        data["samples"][m] = _samples(root / "reports/eval" / m / "samples.jsonl", data["eval"][m])
    for s in strategies:
        path = root / "metrics/teacher" / f"{s}.json"
        data["teacher"][s] = _need(path, read_json(path), TEACHER_KEYS)
        path = root / "metrics/distill" / f"{s}.json"
        data["distill"][s] = _need(path, read_json(path), DISTILL_KEYS)
    data["summary"] = read_json(root / "data/prepared/summary.json")
    return data


# ------------------------------------------------------------------------------------------------ analysis


def paired(base: dict[int, dict], other: dict[int, dict], kind: str, names: tuple[str, str]) -> dict:
    """`other` (a distilled student) vs `base` (the undistilled one) on the same questions: c = questions
    only `other` got right, b = only `base`; diff = (c - b) / n = the accuracy difference; p = exact McNemar."""
    from kd.stats import paired_comparison

    if set(base) != set(other):
        only = sorted(set(base) ^ set(other))[:5]
        raise ArtefactError(f"reports/eval/{names[0]} and reports/eval/{names[1]} were evaluated on different "
                            f"questions (ids differ, e.g. {only}); re-run eval for both")
    key = f"correct_{kind}"
    r = paired_comparison({i: bool(other[i][key]) for i in other}, {i: bool(base[i][key]) for i in base})
    return {"b": r["only_b"], "c": r["only_a"], "n": r["n"], "diff": r["difference"], "p": r["mcnemar_p"]}


def best_kd(data: dict) -> str | None:
    """The kd-<strategy> with the highest strict accuracy (ties: flexible, then params order)."""
    kd = [m for m in data["models"] if m.startswith("kd-")]
    if not kd:
        return None
    ev = data["eval"]
    return max(kd, key=lambda m: (ev[m]["accuracy_strict"], ev[m]["accuracy_flexible"], -kd.index(m)))


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
    ev = data["eval"]
    comparisons = {}
    if "student" in data["models"]:
        for m in data["models"]:
            if m.startswith("kd-"):
                comparisons[m] = {k: paired(data["samples"]["student"], data["samples"][m], k, ("student", m))
                                  for k in ("strict", "flexible")}
    attention = [{k: num(v) for k, v in r.items()} for r in attention]
    order = {m: i for i, m in enumerate(data["models"])}  # params order; unknown names last, by name
    attention.sort(key=lambda r: (order.get(r["model"], len(order)), r["model"], r["layer"]))
    return {"params": params, "data": data, "comparisons": comparisons, "best_kd": best_kd(data),
            "attention": attention, "attention_means": attention_means(attention),
            "eval": ev}


def metrics(an: dict) -> dict:
    """Flat keys for `dvc metrics diff`."""
    data = an["data"]
    out: dict[str, Any] = {}
    for m in data["models"]:
        e = data["eval"][m]
        for k in ("accuracy_strict", "accuracy_flexible", "mean_response_tokens"):
            out[f"{m}.{k}"] = num(e[k])
        out[f"{m}.n"] = e["n"]
    for m, cmp in an["comparisons"].items():
        for kind, r in cmp.items():
            out[f"{m}.delta_{kind}"] = num(r["diff"])
            out[f"{m}.mcnemar_p_{kind}"] = num(r["p"])
    for s in data["strategies"]:
        for k in ("accuracy_strict", "accuracy_flexible"):
            out[f"teacher_transfer.{s}.{k}"] = num(data["teacher"][s][k])
        for k in ("final_loss", "final_ce", "final_kd"):
            out[f"distill.{s}.{k}"] = num(data["distill"][s][k])
    if an["best_kd"]:
        out["best_kd_strategy"] = an["best_kd"][len("kd-"):]
        out["best_kd.accuracy_strict"] = num(data["eval"][an["best_kd"]]["accuracy_strict"])
    for m, means in an["attention_means"].items():
        for s in ATTN_STATS:
            out[f"{m}.attention.{s}"] = num(means[s])
    return out


# ------------------------------------------------------------------------------------------------ page


def _table(headers: list[str], rows: list[list[str]]) -> dict:
    return {"headers": headers, "rows": rows}


def _remote_code(p: dict) -> str:
    """Models load with trust_remote_code=False unless params allow it; the report says which did."""
    on = [role for role in ("teacher", "student") if p[role].get("trust_remote_code")]
    return "off (safetensors weights only, no model code executed)" if not on else \
        f"ON for {' and '.join(on)}: Python code shipped with the model was executed"


def sections(an: dict) -> list[dict]:
    """The page as data: [{title, paras: [str], table: {headers, rows} | None, image: str | None}]."""
    p, data, ev = an["params"], an["data"], an["data"]["eval"]
    out = []

    summ = data["summary"]
    sizes = " · ".join(f"{k} {summ[k]}" for k in ("transfer", "validation", "eval") if k in summ)
    paras = [f"Source: `{summ.get('source', '?')}`" + (f" (seed {summ['seed']})" if "seed" in summ else "")]
    if sizes:
        paras.append(f"Splits: {sizes}.")
    if summ.get("note"):
        paras.append(str(summ["note"]))
    out.append({"title": "Data", "paras": paras})

    d = p["distill"]
    setup = [["teacher", f"`{p['teacher']['model']}` ({p['teacher']['dtype']})"],
             ["student", f"`{p['student']['model']}` ({p['student']['dtype']}), LoRA r={d['lora']['r']} "
                         f"alpha={d['lora']['alpha']} on {', '.join(d['lora']['target_modules'])}"],
             ["alpha (hard-loss weight)", str(p["alpha"])],
             ["temperature", str(p["temperature"])],
             ["KD loss", d["loss"]],
             ["hard target", d["hard_target"]],
             ["epochs · lr", f"{d['epochs']} · {d['lr']}"],
             ["teacher signal", p["logits"]["format"]],
             ["strategies", ", ".join(data["strategies"])],
             ["evaluated models", ", ".join(data["models"])],
             ["max new tokens (teacher · eval)", f"{p['teacher']['max_new_tokens']} · {p['eval']['max_new_tokens']}"],
             ["seed", str(p["seed"])],
             ["remote model code (trust_remote_code)", _remote_code(p)]]
    out.append({"title": "Setup", "paras": [], "table": _table(["param", "value"], setup)})

    rows = []
    for m in data["models"]:
        e = ev[m]
        rows.append([m, pct(e["accuracy_strict"]), f"{pct(e['ci95_strict_low'])} – {pct(e['ci95_strict_high'])}",
                     pct(e["accuracy_flexible"]),
                     f"{pct(e['ci95_flexible_low'])} – {pct(e['ci95_flexible_high'])}",
                     str(e["n"]), fnum(e["mean_response_tokens"], 1)])
    paras = ["Strict: the `#### <number>` line matches the gold answer; flexible: the last number in the "
             "response does. Intervals are 95 % Wilson score intervals."]
    if an["best_kd"]:
        paras.append(f"Best distilled student (strict): **{an['best_kd']}**.")
    out.append({"title": "GSM8K accuracy (eval split)", "paras": paras,
                "table": _table(["model", "strict", "95 % CI", "flexible", "95 % CI", "n", "mean response tokens"],
                                rows),
                "image": "plots/accuracy.png"})

    if an["comparisons"]:
        rows = []
        for m, cmp in an["comparisons"].items():
            row = [m]
            for kind in ("strict", "flexible"):
                r = cmp[kind]
                row += [f"{100 * r['diff']:+.1f}", f"{r['c']} / {r['b']}", pval(r["p"])]
            rows.append(row)
        out.append({"title": "Distilled vs undistilled student (paired)",
                    "paras": ["Same questions, same scoring. Δ = accuracy difference in percentage points; "
                              "gained / lost = questions only the distilled / only the undistilled student got "
                              "right; p = exact two-sided McNemar test on those discordant pairs."],
                    "table": _table(["model", "Δ strict (pp)", "gained / lost", "p", "Δ flexible (pp)",
                                     "gained / lost", "p"], rows)})

    rows = []
    for s in data["strategies"]:
        t = data["teacher"][s]
        rows.append([s, pct(t["accuracy_strict"]), pct(t["accuracy_flexible"]), str(t["n"]),
                     fnum(t["mean_response_tokens"], 1),
                     pct(t["finished_fraction"]) if "finished_fraction" in t else "—"])
    out.append({"title": "Teacher on the transfer set, per strategy",
                "paras": ["The teacher's responses are what each student is distilled on; their accuracy was "
                          "never measured in the original."],
                "table": _table(["strategy", "strict", "flexible", "n", "mean response tokens", "finished"], rows)})

    rows = []
    for s in data["strategies"]:
        r = data["distill"][s]
        rows.append([s, fnum(r["final_loss"], 4), fnum(r["final_ce"], 4), fnum(r["final_kd"], 4), str(r["steps"]),
                     str(r["examples"])])
    out.append({"title": "Distillation",
                "paras": [f"total = {p['alpha']} · CE + (1 − {p['alpha']}) · T² · {d['loss']} "
                          f"(T = {p['temperature']}); final = mean over the last epoch."],
                "table": _table(["strategy", "final loss", "final CE", "final KD", "steps", "examples"], rows)})

    if an["attention"]:
        means = an["attention_means"]
        rows = [[m, str(means[m]["layers"])] + [fnum(means[m][s]) for s in ATTN_STATS] for m in means]
        nprompts = p["report"]["attention_prompts"]
        out.append({"title": "Attention",
                    "paras": [
                        f"Eager attention over the first {nprompts} eval prompt(s) (rendered as in eval), per "
                        "layer, averaged over heads and prompts; the table shows the mean over layers, "
                        "`reports/attention.json` and the plot have every layer.",
                        "Unlike the original, every statistic counts only the causally visible keys (its "
                        "\"sparsity\" counted the masked upper triangle), skips the first query row (one "
                        "visible key, weight 1 by construction), and entropy is also normalised by "
                        "log(visible keys) so short and long rows compare. Density = fraction of visible "
                        "weights above 0.1; top-5 mass = weight on a row's 5 largest keys (rows with more than "
                        "5 keys); similarity = cosine of the same head's map in layers l−1 and l. Density and "
                        "top-5 mass still depend on row length (at most 9 weights of a row can exceed 0.1), so compare them "
                        "only between models on the same prompts, as here; entropy / log(visible keys) is the "
                        "length-free one."],
                    "table": _table(["model", "layers"] + [ATTN_LABELS[s] for s in ATTN_STATS], rows),
                    "image": "plots/attention.png"})
    return out


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(an: dict) -> str:
    lines = ["# kd-prime report", ""]
    prof = an["params"].get("profile")
    if prof:
        lines += [f"Profile: `{prof}`.", ""]
    for sec in sections(an):
        lines += [f"## {sec['title']}", ""]
        for para in sec["paras"]:
            lines += [para, ""]
        t = sec.get("table")
        if t:
            lines.append("| " + " | ".join(_md_cell(h) for h in t["headers"]) + " |")
            lines.append("|" + "|".join("---" for _ in t["headers"]) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t["rows"]]
            lines.append("")
        if sec.get("image"):
            lines += [f"![{sec['title']}]({sec['image']})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _inline(s: str) -> str:
    """Markdown-ish inline (`code`, **bold**) -> escaped HTML."""
    out, parts = [], s.split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            bold = part.split("**")
            out.append("".join(f"<b>{html.escape(b)}</b>" if j % 2 else html.escape(b) for j, b in enumerate(bold)))
    return "".join(out)


def render_html(an: dict) -> str:
    css = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
           "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
           "img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}")
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           "<title>kd-prime report</title>", f"<style>{css}</style>", "</head>", "<body>",
           "<h1>kd-prime report</h1>"]
    prof = an["params"].get("profile")
    if prof:
        out.append(f"<p>Profile: <code>{html.escape(prof)}</code>.</p>")
    for sec in sections(an):
        out.append(f"<h2>{html.escape(sec['title'])}</h2>")
        out += [f"<p>{_inline(para)}</p>" for para in sec["paras"]]
        t = sec.get("table")
        if t:
            out.append("<table>")
            out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t["headers"]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in t["rows"]]
            out.append("</table>")
        if sec.get("image"):
            out.append(f'<p><img src="{html.escape(sec["image"])}" alt="{html.escape(sec["title"])}"></p>')
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ plots


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # no Software/Creation-time chunks: identical bytes on every run
    fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
    return buf.getvalue()


RC = {"svg.hashsalt": "kd-prime", "font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True,
      "grid.alpha": 0.3, "figure.dpi": PNG_DPI, "savefig.dpi": PNG_DPI, "path.simplify": False}


def plot_accuracy(an: dict) -> bytes:
    import matplotlib
    from matplotlib.figure import Figure

    data = an["data"]
    models = data["models"]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(max(5.0, 1.1 * len(models) + 1.5), 3.6))
        ax = fig.add_subplot(1, 1, 1)
        width = 0.38
        for j, kind in enumerate(("strict", "flexible")):
            xs = [i + (j - 0.5) * width for i in range(len(models))]
            acc = [100 * data["eval"][m][f"accuracy_{kind}"] for m in models]
            lo = [a - 100 * data["eval"][m][f"ci95_{kind}_low"] for a, m in zip(acc, models)]
            hi = [100 * data["eval"][m][f"ci95_{kind}_high"] - a for a, m in zip(acc, models)]
            ax.bar(xs, acc, width, yerr=[lo, hi], capsize=3, label=kind, color=("C0", "C1")[j])
        ax.set_xticks(list(range(len(models))))
        ax.set_xticklabels(models, rotation=30, ha="right")
        ax.set_ylabel("GSM8K accuracy (%), 95 % Wilson CI")
        ax.set_ylim(0, 100)
        ax.legend(loc="upper left")
        fig.tight_layout()
        return _png(fig)


def plot_attention(an: dict) -> bytes:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = an["attention"]
    last = max(r["layer"] for r in rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10, 6.4))
        for k, stat in enumerate(PLOT_STATS):
            ax = fig.add_subplot(2, 2, k + 1)
            for i, m in enumerate(models):
                pts = [(r["layer"], r[stat]) for r in rows if r["model"] == m and r.get(stat) is not None]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=m,
                            color=f"C{i % 10}")
            ax.set_title(ATTN_LABELS[stat])
            ax.set_xlabel("layer")
            ax.set_xlim(-0.3, last + 0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if k == 0:
                ax.legend(fontsize=7)
        fig.tight_layout()
        return _png(fig)


# ------------------------------------------------------------------------------------------------ stage


def write_report(params: dict, attention: list[dict], root: str | Path = ".") -> dict:
    """Read inputs under `root`, write reports/{index.md,index.html,attention.json,plots/} and
    metrics/report.json (all atomically). Returns the flat metrics."""
    root = Path(root)
    an = analyse(params, collect(params, root), attention)
    with atomic_path(root / "reports/plots") as tmp:
        tmp.mkdir()
        (tmp / "accuracy.png").write_bytes(plot_accuracy(an))
        if an["attention"]:
            (tmp / "attention.png").write_bytes(plot_attention(an))
    write_json(root / "reports/attention.json", an["attention"])
    write_text(root / "reports/index.md", render_markdown(an))
    write_text(root / "reports/index.html", render_html(an))
    m = metrics(an)
    write_json(root / "metrics/report.json", m)
    return m
