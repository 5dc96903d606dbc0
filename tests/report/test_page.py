"""kd.report.page on fabricated stage outputs: tables, paired tests, metrics, missing/inconsistent inputs, and
byte-identical outputs (PNGs included) on a second run and in a fresh process."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kd.config.params import parse
from kd.config.profiles import load as load_profile
from kd.core.errors import ArtefactError, KdError
from kd.eval.stats import wilson_interval
from kd.report.page import write_report

REPO = Path(__file__).resolve().parents[2]
N = 20
OUTPUTS = ["reports/index.md", "reports/index.html", "reports/attention.json", "reports/accuracy.json",
           "reports/comparisons.json", "reports/plots/accuracy.png", "reports/plots/attention.png",
           "metrics/strict/student.json", "metrics/flexible/kd-teacher.json", "metrics/strict/teacher@none.json",
           "metrics/compare/priming/kd-teacher.json", "metrics/compare/teacher/kd-none.json",
           "metrics/compare/training/finetune.json"]


def arms(params):
    from kd.config.arms import arm_names

    return arm_names(params["prompting"]["strategies"])


def trained(params):
    return ["finetune"] + [f"kd-{s}" for s in params["prompting"]["strategies"]]


@pytest.fixture(scope="module")
def params():
    from kd.config.params import validate

    return validate(load_profile("tiny", REPO), root=REPO)


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def correctness(params) -> dict[str, list[tuple[bool, bool]]]:
    """model -> per-question (strict, flexible); flexible is never below strict."""
    rng = random.Random(7)
    out = {}
    for k, m in enumerate(arms(params)):
        p = 0.2 + 0.08 * k
        rows = []
        for _ in range(N):
            s = rng.random() < p
            rows.append((s, s or rng.random() < 0.3))
        out[m] = rows
    return out


def fabricate(root: Path, params) -> dict:
    corr = correctness(params)
    for m, rows in corr.items():
        questions = [{"id": 100 + i, "gold": str(i), "strict": str(i) if s else None, "flexible": str(i) if f else "0",
                      "correct_strict": s, "correct_flexible": f, "tokens": 10 + i, "truncated": i % 7 == 0}
                     for i, (s, f) in enumerate(rows)]
        _write_questions(root, m, questions)
        ks, kf = sum(s for s, _ in rows), sum(f for _, f in rows)
        ls, hs = wilson_interval(ks, N)
        lf, hf = wilson_interval(kf, N)
        _dump(root / "results/eval" / f"{m}.json",
              {"accuracy_strict": ks / N, "accuracy_flexible": kf / N, "ci95_strict_low": ls, "ci95_strict_high": hs,
               "ci95_flexible_low": lf, "ci95_flexible_high": hf, "correct_strict": ks, "correct_flexible": kf,
               "n": N, "mean_response_tokens": 17.25 + len(m), "truncated": 3})
    for j, s in enumerate(params["prompting"]["strategies"]):
        _dump(root / "results/teacher" / f"{s}.json", {"accuracy_strict": 0.125 * j, "accuracy_flexible": 0.25,
                                                       "n": 8, "mean_response_tokens": 24.0,
                                                       "finished_fraction": 0.75})
    for j, s in enumerate(["finetune"] + params["prompting"]["strategies"]):
        _dump(root / "results/distill" / f"{s}.json", {"final_loss": 3.1 + j / 7, "final_ce": 4.0, "final_kd": 0.01,
                                                       "steps": 16, "examples": 8,
                                                       "hard_target": "gold" if j == 0 else "teacher"})
    _dump(root / "data/prepared/summary.json", {"source": "jsonl:tests/data/gsm8k", "note": "a | b note",
                                                "seed": 0, "transfer": 8, "validation": 4, "eval": N})
    return corr


def _write_questions(root: Path, arm: str, rows: list[dict]) -> None:
    """results/eval/<arm>.jsonl, as the eval stage writes it (kd.eval.evaluate.question_rows)."""
    (root / "results/eval").mkdir(parents=True, exist_ok=True)
    (root / "results/eval" / f"{arm}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_questions(root: Path, arm: str) -> list[dict]:
    return [json.loads(x) for x in (root / "results/eval" / f"{arm}.jsonl").read_text().splitlines()]


def attention_fixture(params) -> list[dict]:
    rows = []
    for k, m in enumerate(["student", "finetune"] + [f"kd-{s}" for s in params["prompting"]["strategies"]]):
        for layer in range(3):
            rows.append({"model": m, "layer": layer, "entropy": 2.0 + 0.1 * k - 0.3 * layer,
                         "entropy_norm": 0.8 - 0.1 * layer + 0.01 * k, "self_focus": 0.1 + 0.05 * layer,
                         "density": 1 / 3 + 0.01 * k, "top5_mass": 0.5 + 0.1 * layer,
                         "similarity": None if layer == 0 else 0.9 - 0.01 * k})
    return rows


def ref_mcnemar(b: int, c: int) -> float:
    m = b + c
    if m == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2 ** m)


@pytest.fixture()
def built(tmp_path, params):
    corr = fabricate(tmp_path, params)
    m = write_report(parse(params), attention_fixture(params), tmp_path)
    return tmp_path, corr, m


def test_outputs_and_metrics(built, params):
    root, corr, m = built
    for rel in OUTPUTS:
        assert (root / rel).is_file(), rel
    # the headline: one file per row with the same few keys, percent; each number in one metrics file
    h = m["headline"]
    assert sorted(h) == sorted(str(p.relative_to(root)) for p in (root / "metrics").rglob("*.json"))
    for rel, row in h.items():
        assert json.loads((root / rel).read_text()) == row
    assert m["best_arm"] is None or m["best_arm"] in trained(params)
    for model in arms(params):
        for idx, kind in enumerate(("strict", "flexible")):
            row = h[f"metrics/{kind}/{model}.json"]
            k = sum(1 for a in corr[model] if a[idx])
            lo, hi = wilson_interval(k, N)
            assert row == {"acc": round(100 * k / N, 2), "lo": round(100 * lo, 2), "hi": round(100 * hi, 2)}
    for s in params["prompting"]["strategies"]:
        assert set(h[f"metrics/strict/teacher@{s}.json"]) == {"acc", "lo", "hi"}
    # the three families (kd.config.arms), on the primary metric (strict by default): every pair, no other
    compare = sorted(r for r in h if r.startswith("metrics/compare/"))
    assert compare == sorted(["metrics/compare/priming/kd-teacher.json", "metrics/compare/teacher/kd-none.json",
                              "metrics/compare/teacher/kd-teacher.json", "metrics/compare/training/finetune.json",
                              "metrics/compare/training/kd-none.json", "metrics/compare/training/kd-teacher.json"])
    assert all(set(h[r]) == {"delta", "p_holm", "mde_obs", "mde_plan"} for r in compare)
    detail = json.loads((root / "reports/comparisons.json").read_text())  # both metrics, raw p, counts
    assert len(detail) == 2 * len(compare) and {"gained", "lost", "p", "p_holm", "n"} <= set(detail[0])
    acc = json.loads((root / "reports/accuracy.json").read_text())
    assert [(r["model"], r["metric"]) for r in acc] == [(a, k) for a in arms(params) for k in ("strict", "flexible")]


def _holm_ref(ps: list[float]) -> list[float]:
    """Holm step-down adjusted p-values, written from the definition: sort, multiply the i-th smallest by
    (m - i), take the running maximum, cap at 1; back in input order."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    adj, run = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        run = max(run, min(1.0, (m - rank) * ps[i]))
        adj[i] = run
    return adj


def _power_ref(n: int, psi: float, d: float) -> float:
    """Exact McNemar power by brute-force binomial sums (math.comb, float64), independent of kd.eval.stats."""
    pw = (psi + d) / (2 * psi)
    total = 0.0
    for mm in range(n + 1):
        w = math.comb(n, mm) * psi ** mm * (1 - psi) ** (n - mm)
        for c in range(mm + 1):
            if ref_mcnemar(mm - c, c) <= 0.05:
                total += w * math.comb(mm, c) * pw ** c * (1 - pw) ** (mm - c)
    return total


def _mde_ref(n: int, psi: float) -> float | None:
    for k in range(1, n + 1):
        if k / n <= psi + 1e-12 and _power_ref(n, psi, min(k / n, psi)) >= 0.8:
            return k / n
    return None


def test_metrics_rederived_from_the_committed_question_rows_alone(built, params):
    """Issue 19: every count, interval and p in metrics/ follows from results/eval/<arm>.jsonl (committed to git)
    alone, recomputed here with scipy.stats.binomtest directly and a Holm / power written from their definitions
    (no kd.eval.stats); the teacher rows from results/teacher/<s>.json's counts."""
    from scipy.stats import binomtest

    root, _, _ = built
    rows = {a: {r["id"]: r for r in _read_questions(root, a)} for a in arms(params)}
    metrics = {p.relative_to(root / "metrics").as_posix(): json.loads(p.read_text())
               for p in (root / "metrics").rglob("*.json")}
    seen = set()
    for a in arms(params):
        for kind in ("strict", "flexible"):
            k = sum(r[f"correct_{kind}"] for r in rows[a].values())
            n = len(rows[a])
            ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            row = metrics[f"{kind}/{a}.json"]
            assert row["acc"] == pytest.approx(100 * k / n, abs=0.005)
            assert row["lo"] == pytest.approx(100 * max(ci.low, 0.0), abs=0.005)
            assert row["hi"] == pytest.approx(100 * min(ci.high, 1.0), abs=0.005)
            seen.add(f"{kind}/{a}.json")
    for s in params["prompting"]["strategies"]:
        t = json.loads((root / f"results/teacher/{s}.json").read_text())
        for kind in ("strict", "flexible"):
            ci = binomtest(round(t[f"accuracy_{kind}"] * t["n"]), t["n"]).proportion_ci(method="wilson")
            assert metrics[f"{kind}/teacher@{s}.json"]["lo"] == pytest.approx(100 * max(ci.low, 0), abs=0.005)
            assert metrics[f"{kind}/teacher@{s}.json"]["hi"] == pytest.approx(100 * min(ci.high, 1), abs=0.005)
            seen.add(f"{kind}/teacher@{s}.json")
    kd_arms = [f"kd-{s}" for s in params["prompting"]["strategies"]]
    fams = {"priming": [(a, "kd-none") for a in kd_arms if a != "kd-none"],
            "teacher": [(a, "finetune") for a in kd_arms],
            "training": [(a, "student") for a in ["finetune", *kd_arms]]}
    primary = params["report"]["primary_metric"]
    key = f"correct_{primary}"
    comparisons = json.loads((root / "reports/comparisons.json").read_text())
    for fam, pairs in fams.items():
        ps, deltas, mdes = [], [], []
        for a, ref in pairs:
            gained = sum(rows[a][i][key] and not rows[ref][i][key] for i in rows[a])
            lost = sum(rows[ref][i][key] and not rows[a][i][key] for i in rows[a])
            n = len(rows[a])
            ps.append(binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0)
            deltas.append(100 * (gained - lost) / n)
            mdes.append(_mde_ref(n, (gained + lost) / n))
        for (a, _), p, ph, d, mde in zip(pairs, ps, _holm_ref(ps), deltas, mdes):
            row = metrics[f"compare/{fam}/{a}.json"]
            assert row["p_holm"] == pytest.approx(ph, abs=5e-5)
            detail = next(r for r in comparisons if (r["family"], r["arm"], r["metric"]) == (fam, a, primary))
            assert detail["p"] == pytest.approx(p, rel=1e-5)
            assert row["delta"] == pytest.approx(d, abs=0.005)
            assert row["mde_obs"] == (None if mde is None else pytest.approx(100 * mde, abs=0.005))
            plan = _mde_ref(N, params["report"]["planning_disagreement"])
            assert row["mde_plan"] == (None if plan is None else pytest.approx(100 * plan, abs=0.005))
            seen.add(f"compare/{fam}/{a}.json")
    assert seen == set(metrics) - {"environment.json"}  # every number in metrics/ was re-derived


def test_no_winner_from_a_tie(tmp_path, params):
    """Issue 7.6: with every trained arm within noise of the base student, no best arm is named."""
    fabricate(tmp_path, params)
    base = (tmp_path / "results/eval/student.jsonl").read_bytes()
    for arm in trained(params):  # every trained arm answers exactly like the base student
        (tmp_path / "results/eval" / f"{arm}.jsonl").write_bytes(base)
        (tmp_path / "results/eval" / f"{arm}.json").write_bytes((tmp_path / "results/eval/student.json").read_bytes())
    m = write_report(parse(params), [], tmp_path)
    md = (tmp_path / "reports/index.md").read_text()
    assert m["best_arm"] is None
    assert "no arm differs detectably from student" in md and "No best arm is named" in md
    assert "Best arm" not in md and "is better than" not in md
    # no disagreement at all: no difference is detectable at the observed rate (no best-case floor)
    assert "no difference is detectable" in md
    row = json.loads((tmp_path / "metrics/compare/training/finetune.json").read_text())
    assert row["mde_obs"] is None and row["p_holm"] == 1.0 and row["delta"] == 0.0


def _make_better(root: Path, params, winner: str, kind: str) -> int:
    """Every trained arm answers like the base student, except `winner`, which also gets every question the base
    student missed right on `kind`. Returns how many questions that is."""
    rows = _read_questions(root, "student")
    for arm in trained(params):
        better = [{**r, f"correct_{kind}": arm == winner or r[f"correct_{kind}"]} for r in rows]
        _write_questions(root, arm, better)
        d = json.loads((root / "results/eval/student.json").read_text())
        d[f"correct_{kind}"] = sum(r[f"correct_{kind}"] for r in better)
        (root / "results/eval" / f"{arm}.json").write_text(json.dumps(d))
    return sum(not r[f"correct_{kind}"] for r in rows)


def test_winner_only_when_significant_on_the_primary_metric(tmp_path, params):
    fabricate(tmp_path, params)
    assert params["report"]["primary_metric"] == "strict"  # the default: lm-eval's strict-match
    gained = _make_better(tmp_path, params, "kd-teacher", "strict")
    assert gained >= 7  # 0/7 discordant one way: p = 2/128 < 0.05 / 3 arms (Holm)
    m = write_report(parse(params), [], tmp_path)
    md = (tmp_path / "reports/index.md").read_text()
    assert m["best_arm"] == "kd-teacher" and "Best arm: **kd-teacher**" in md
    # it is also the only significant arm of the other two families (vs kd-none, vs finetune)
    assert "**kd-teacher** is better than kd-none" in md and "**kd-teacher** is better than finetune" in md
    # the same gain on the other metric names no best arm: the conclusion uses the primary metric only
    fabricate(tmp_path, params)
    _make_better(tmp_path, params, "kd-teacher", "flexible")
    m = write_report(parse(params), [], tmp_path)
    assert m["best_arm"] is None and "No best arm is named" in (tmp_path / "reports/index.md").read_text()
    flex = {**params, "report": {**params["report"], "primary_metric": "flexible"}}
    m = write_report(parse(flex), [], tmp_path)
    md = (tmp_path / "reports/index.md").read_text()
    assert m["best_arm"] == "kd-teacher" and "**flexible** accuracy (`report.primary_metric`)" in md


def test_paper_comparison_is_read_first(built, params):
    """kd-<s> vs kd-none is the first section after the conclusion and the first metrics (by path)."""
    root, _, m = built
    md = (root / "reports/index.md").read_text()
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Conclusion"
    assert sections[1].startswith("## KD with a priming strategy vs KD without")
    assert sections[2].startswith("## KD vs the fine-tune control") and sections[3].startswith("## Trained arms vs")
    assert sorted(m["headline"])[0] == "metrics/compare/priming/kd-teacher.json"
    assert "| kd-teacher | kd-none |" in md
    # the conclusion names the families in the same order
    concl = md.split("## Conclusion", 1)[1].split("\n## ", 1)[0]
    assert concl.index("KD with a priming") < concl.index("KD vs the fine-tune") < concl.index("Trained arms vs")
    assert "What this sample could detect" in concl and "planning disagreement of 30 %" in concl


def test_without_none_the_paper_comparison_says_why(tmp_path, params):
    p = {**params, "prompting": {**params["prompting"], "strategies": ["teacher"]}}
    fabricate(tmp_path, p)
    m = write_report(parse(p), [], tmp_path)
    md = (tmp_path / "reports/index.md").read_text()
    assert "`none` is not among prompting.strategies" in md
    assert not [r for r in m["headline"] if r.startswith("metrics/compare/priming/")]
    assert "metrics/compare/teacher/kd-teacher.json" in m["headline"]
    # and the priming rows of an earlier run do not linger
    assert not (tmp_path / "metrics/compare/priming").exists() or not list(
        (tmp_path / "metrics/compare/priming").iterdir())


def test_stale_compare_rows_removed(built, params):
    root, _, _ = built
    p = {**params, "prompting": {**params["prompting"], "strategies": ["teacher"]}}
    write_report(parse(p), [], root)
    assert not list((root / "metrics/compare/priming").glob("*.json"))
    assert not (root / "metrics/compare/training/kd-none.json").exists()


def test_training_effect_table(tmp_path, params):
    """results/distill/<arm>.json's update norm and validation NLL per trained arm; older results without them
    show "—"."""
    fabricate(tmp_path, params)
    path = tmp_path / "results/distill/teacher.json"
    d = json.loads(path.read_text())
    path.write_text(json.dumps({**d, "update_norm_ratio": 0.000234, "val_nll_before": 1.5, "val_nll_after": 1.25}))
    write_report(parse(params), [], tmp_path)
    md = (tmp_path / "reports/index.md").read_text()
    assert "## Did training move the student?" in md
    assert "| kd-teacher | 2.34e-04 | 1.5000 | 1.2500 | -0.2500 |" in md
    assert "| finetune | — | — | — | — |" in md and "| kd-none | — | — | — | — |" in md


def test_mixed_environment_named_in_words(tmp_path, params):
    fabricate(tmp_path, params)
    for stage, fp in (("eval-student", "aaaaaaaaaaaa"), ("eval-finetune", "bbbbbbbbbbbb"),
                      ("distill-none", "aaaaaaaaaaaa")):
        _dump(tmp_path / f"environment/{stage}.json", {
            "stage": stage, "fingerprint": fp, "cpu": {"model": "cpu", "machine": "x86_64", "isa": ["avx2"]},
            "python": "3.11", "packages": {k: "1" for k in ("torch", "transformers", "peft", "lm_eval")},
            "torch": {"cpu_capability": "AVX2", "threads": 2, "onednn_version": None, "mkl_version": None},
            "env_vars": {}})
    write_report(parse(params), [], tmp_path)
    md = (tmp_path / "reports/index.md").read_text()
    concl = md.split("## Conclusion", 1)[1].split("\n## ", 1)[0]
    assert "ran in 2 different environments" in concl and "`mixed`" in concl
    assert "`aaaaaaaaaaaa`: distill-none, eval-student" in concl and "`bbbbbbbbbbbb`: eval-finetune" in concl
    (tmp_path / "environment/eval-finetune.json").unlink()
    write_report(parse(params), [], tmp_path)
    assert "different environments" not in (tmp_path / "reports/index.md").read_text()


def test_cot_sentence_states_only_what_was_measured(built):
    root, _, _ = built
    md = (root / "reports/index.md").read_text()
    assert "alone makes" not in md
    assert "This difference is measured, not tested" in md


def test_page_contents(built, params):
    root, corr, _ = built
    md = (root / "reports/index.md").read_text()
    html = (root / "reports/index.html").read_text()
    for model in arms(params):
        assert f"| {model} |" in md and f"<td>{model}</td>" in html
    ks = sum(s for s, _ in corr["student"])
    lo, hi = wilson_interval(ks, N)
    assert f"| base student (no training) | {100 * ks / N:.1f} % | {100 * lo:.1f} % – {100 * hi:.1f} % |" in md
    for needle in ("a | b note", str(params["alpha"]), str(params["temperature"]), "reverse_kl",
                   "distill.hard_target: teacher", "distill.response_filter: all", "McNemar", "detectable",
                   "truncated", "fine-tune control", "Let's think step by step", "plots/accuracy.png",
                   "plots/attention.png", "masked upper", "Teacher on the transfer set",
                   "not to lm-eval's published 5-shot"):
        assert needle in md, needle
    assert "a | b note" in html and "<img src=\"plots/attention.png\"" in html
    assert str(root) not in md + html  # no absolute paths
    rows = json.loads((root / "reports/attention.json").read_text())
    assert isinstance(rows, list) and {"model", "layer", "entropy_norm", "similarity"} <= set(rows[0])
    assert rows[0]["similarity"] is None and rows[0]["density"] == 0.333333  # 6 significant digits


def test_byte_identical_rerun_and_fresh_process(built, params, tmp_path_factory):
    root, _, _ = built
    first = {rel: (root / rel).read_bytes() for rel in OUTPUTS}
    assert first["reports/plots/accuracy.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert b"Software" not in first["reports/plots/accuracy.png"]
    write_report(parse(params), attention_fixture(params), root)
    assert {rel: (root / rel).read_bytes() for rel in OUTPUTS} == first
    # a fresh interpreter (fresh matplotlib state, different hash seed) writes the same bytes elsewhere
    other = tmp_path_factory.mktemp("fresh")
    fabricate(other, params)
    (other / "in.json").write_text(json.dumps({"params": params, "attention": attention_fixture(params)}))
    code = ("import json,sys; from kd.config.params import parse; from kd.report.page import write_report; "
            "d=json.load(open(sys.argv[1]+'/in.json')); write_report(parse(d['params']), d['attention'], sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(other)], check=True, cwd=REPO,
                   env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                        "MPLCONFIGDIR": str(other / ".mpl")})
    assert {rel: (other / rel).read_bytes() for rel in OUTPUTS} == first
    assert not [p for p in (root / "reports").iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_missing_model_names_the_file(tmp_path, params):
    fabricate(tmp_path, params)
    (tmp_path / "results/eval/kd-teacher.json").unlink()
    with pytest.raises(KdError, match=r"results/eval/kd-teacher\.json: missing"):
        write_report(parse(params), [], tmp_path)
    assert not (tmp_path / "reports/index.md").exists() and not (tmp_path / "metrics").exists()


def test_missing_questions_and_distill_name_the_file(tmp_path, params):
    fabricate(tmp_path, params)
    (tmp_path / "results/eval/kd-none.jsonl").unlink()
    with pytest.raises(ArtefactError, match=r"results/eval/kd-none\.jsonl: missing"):
        write_report(parse(params), [], tmp_path)
    fabricate(tmp_path, params)
    (tmp_path / "results/distill/teacher.json").unlink()
    with pytest.raises(ArtefactError, match=r"results/distill/teacher\.json"):
        write_report(parse(params), [], tmp_path)


def test_inconsistent_inputs_rejected(tmp_path, params):
    fabricate(tmp_path, params)
    path = tmp_path / "results/eval/student.json"
    d = json.loads(path.read_text())
    d["correct_strict"] += 1  # stale metrics next to newer samples
    path.write_text(json.dumps(d))
    with pytest.raises(ArtefactError, match="correct_strict"):
        write_report(parse(params), [], tmp_path)
    fabricate(tmp_path, params)
    d = json.loads(path.read_text())
    del d["ci95_flexible_high"]
    path.write_text(json.dumps(d))
    with pytest.raises(ArtefactError, match="ci95_flexible_high"):
        write_report(parse(params), [], tmp_path)
    fabricate(tmp_path, params)
    s = tmp_path / "results/eval/kd-none.jsonl"
    rows = [json.loads(x) for x in s.read_text().splitlines()]
    rows[0]["id"] = 999  # evaluated on a different question than the student
    s.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ArtefactError, match="different questions"):
        write_report(parse(params), [], tmp_path)


def test_no_attention_rows(tmp_path, params):
    fabricate(tmp_path, params)
    write_report(parse(params), [], tmp_path)
    assert not (tmp_path / "reports/plots/attention.png").exists()
    assert json.loads((tmp_path / "reports/attention.json").read_text()) == []
    assert "## Attention" not in (tmp_path / "reports/index.md").read_text()


def test_attention_read_from_the_attention_stages(tmp_path, params):
    """The report reads the attention stages' per-arm files (kd.config.arms order) and loads no model; a missing or
    malformed file is named."""
    from kd.report.page import read_attention

    rows = attention_fixture(params)
    arms = list(dict.fromkeys(r["model"] for r in rows))
    with pytest.raises(ArtefactError, match=f"reports/attention/{arms[0]}.json"):
        read_attention(params["prompting"]["strategies"], tmp_path)
    for arm in reversed(arms):  # written in any order, read in the arms' order
        _dump(tmp_path / f"reports/attention/{arm}.json", [r for r in rows if r["model"] == arm])
    assert read_attention(params["prompting"]["strategies"], tmp_path) == rows
    for bad in ({"model": arms[-1], "layer": 0}, [{**rows[0], "model": arms[0]}]):  # not a list; another arm's rows
        _dump(tmp_path / f"reports/attention/{arms[-1]}.json", bad)
        with pytest.raises(ArtefactError, match=f"{arms[-1]}.json: not a list of {arms[-1]}'s"):
            read_attention(params["prompting"]["strategies"], tmp_path)


@pytest.mark.parametrize("key,value,allowed", [("primary_metric", "exact", "strict, flexible"),
                                               ("planning_disagreement", 0, "(0.0, 1.0]"),
                                               ("planning_disagreement", 1.5, "(0.0, 1.0]"),
                                               ("planning_disagreement", "a third", "(0.0, 1.0]")])
def test_report_params_validated(params, key, value, allowed):
    from kd.config.params import validate

    bad = load_profile("tiny", REPO)
    bad["report"][key] = value
    with pytest.raises(KdError, match=rf"report\.{key}.*{re.escape(allowed)}"):
        validate(bad, root=REPO)
    ok = load_profile("tiny", REPO)
    ok["report"]["planning_disagreement"] = 1
    assert validate(ok, root=REPO)["report"]["planning_disagreement"] == 1.0


def test_plan_questions_and_cost(tmp_path, params):
    """`kd plan`: questions a detectable difference needs, at the committed results' measured disagreement (the
    largest of the paper's family), else the planning value; the cost from the eval stage's time per question."""
    from kd.eval.stats import mcnemar_power, mcnemar_sample_size
    from kd.tools.plan import plan

    # no committed results: the planning disagreement
    lines = plan(parse(params), 0.2, root=tmp_path)
    n = mcnemar_sample_size(0.2, 0.3)
    assert "at 30.0 % disagreement [report.planning_disagreement" in lines[0] and f"needs {n} paired" in lines[0]
    assert mcnemar_power(n, 0.3, 0.2) >= 0.8 > mcnemar_power(n - 1, 0.3, 0.2)
    assert "cost: unknown here" in lines[1]
    # committed results: the disagreement measured on kd-teacher vs kd-none (strict), counted independently
    corr = fabricate(tmp_path, params)
    d = sum(a[0] != b[0] for a, b in zip(corr["kd-teacher"], corr["kd-none"])) / N
    lines = plan(parse(params), 0.2, root=tmp_path)
    assert f"at {100 * d:.1f} % disagreement [measured" in lines[0] and "kd-teacher vs kd-none, strict" in lines[0]
    assert f"needs {mcnemar_sample_size(0.2, d)} paired" in lines[0]
    # the eval stage's own time per question where it recorded one, else kd bench's decoding speed
    for m in arms(params):
        path = tmp_path / "results/eval" / f"{m}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "seconds": 2.0 * N}))
    lines = plan(parse(params), 0.2, root=tmp_path)
    n = mcnemar_sample_size(0.2, d)
    hours = 2.0 * n * len(arms(params)) / 3600
    assert f"about {hours:.1f} h" in lines[1] and "student 2.00 s" in lines[1] and "seconds / n" in lines[1]
    assert f"about {3.0 * n * len(arms(params)) / 3600:.1f} h" in plan(parse(params), 0.2, root=tmp_path, seconds=3.0)[1]
    # a difference larger than the disagreement cannot occur: one clear error
    with pytest.raises(KdError, match="needs the two arms to disagree on at least"):
        plan(parse(params), 0.5, disagreement=0.3, root=tmp_path)


def test_plan_cli_rejects_bad_input():
    from click.testing import CliRunner

    from kd.tools.cli import cli

    for args in (["--mde", "0"], ["--mde", "150"], ["--mde", "10", "--seconds-per-question", "-1"]):
        res = CliRunner().invoke(cli, ["plan", *args])
        assert isinstance(res.exception, KdError), (args, res.output)
