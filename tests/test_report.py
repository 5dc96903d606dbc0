"""kd.report on fabricated stage outputs: tables, paired tests, metrics, missing/inconsistent inputs, and
byte-identical outputs (PNGs included) on a second run and in a fresh process."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kd.errors import ArtefactError, KdError
from kd.report import write_report
from kd.stats import wilson_interval
from kd.profiles import load as load_profile

REPO = Path(__file__).resolve().parent.parent
N = 20
OUTPUTS = ["reports/index.md", "reports/index.html", "reports/attention.json", "reports/accuracy.json",
           "reports/plots/accuracy.png", "reports/plots/attention.png", "metrics/strict/student.json",
           "metrics/flexible/kd-teacher.json", "metrics/strict/teacher@none.json"]


def arms(params):
    from kd.arms import arm_names

    return arm_names(params["prompting"]["strategies"])


def trained(params):
    return ["finetune"] + [f"kd-{s}" for s in params["prompting"]["strategies"]]


@pytest.fixture(scope="module")
def params():
    from kd.params import validate

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
        samples = [{"id": 100 + i, "prompt": f"q{i}", "response": f"r{i} #### {i}", "gold": str(i),
                    "pred_strict": str(i) if s else None, "pred_flexible": str(i) if f else "0",
                    "correct_strict": s, "correct_flexible": f, "truncated": i % 7 == 0}
                   for i, (s, f) in enumerate(rows)]
        (root / "reports/eval" / m).mkdir(parents=True, exist_ok=True)
        (root / "reports/eval" / m / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
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
    m = write_report(params, attention_fixture(params), tmp_path)
    return tmp_path, corr, m


def test_outputs_and_metrics(built, params):
    from kd.stats import mcnemar_mde

    root, corr, m = built
    for rel in OUTPUTS:
        assert (root / rel).is_file(), rel
    # the headline: one file per (kind, row) with the same few keys, percent; each number in one metrics file
    h = m["headline"]
    assert sorted(h) == sorted(str(p.relative_to(root)) for p in (root / "metrics").rglob("*.json"))
    for rel, row in h.items():
        assert json.loads((root / rel).read_text()) == row
    assert m["best_arm"] is None or m["best_arm"] in trained(params)
    base = corr["student"]
    for model in arms(params):
        for idx, kind in enumerate(("strict", "flexible")):
            row = h[f"metrics/{kind}/{model}.json"]
            k = sum(1 for a in corr[model] if a[idx])
            lo, hi = wilson_interval(k, N)
            assert (row["acc"], row["lo"], row["hi"]) == (round(100 * k / N, 2), round(100 * lo, 2), round(100 * hi, 2))
            if model not in trained(params):
                assert set(row) == {"acc", "lo", "hi"}
                continue
            # paired comparison vs the base student, against an independent count + binomial reference
            c = sum(1 for a, b in zip(corr[model], base) if a[idx] and not b[idx])
            b = sum(1 for a, b in zip(corr[model], base) if b[idx] and not a[idx])
            assert row["p"] == pytest.approx(ref_mcnemar(b, c), abs=5e-5)
            assert row["mde"] == pytest.approx(100 * mcnemar_mde(N, (b + c) / N), abs=5e-3)
    for s in params["prompting"]["strategies"]:
        assert set(h[f"metrics/strict/teacher@{s}.json"]) == {"acc", "lo", "hi"}
    acc = json.loads((root / "reports/accuracy.json").read_text())
    assert [(r["model"], r["metric"]) for r in acc] == [(a, k) for a in arms(params) for k in ("strict", "flexible")]


def test_no_winner_from_a_tie(tmp_path, params):
    """Issue 7.6: with every trained arm within noise of the base student, no best arm is named."""
    fabricate(tmp_path, params)
    base = (tmp_path / "reports/eval/student/samples.jsonl").read_bytes()
    for arm in trained(params):  # every trained arm answers exactly like the base student
        (tmp_path / "reports/eval" / arm / "samples.jsonl").write_bytes(base)
        (tmp_path / "results/eval" / f"{arm}.json").write_bytes((tmp_path / "results/eval/student.json").read_bytes())
    m = write_report(params, [], tmp_path)
    md = (tmp_path / "reports/index.md").read_text()
    assert m["best_arm"] is None
    assert "No trained arm differs detectably" in md and "Best" not in md and "beats" not in md


def test_winner_only_when_significant(tmp_path, params):
    fabricate(tmp_path, params)
    rows = [json.loads(x) for x in (tmp_path / "reports/eval/student/samples.jsonl").read_text().splitlines()]
    for arm in trained(params):
        better = [{**r, "correct_flexible": arm == "kd-teacher" or r["correct_flexible"]} for r in rows]
        (tmp_path / "reports/eval" / arm / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in better))
        d = json.loads((tmp_path / "results/eval/student.json").read_text())
        d["correct_flexible"] = sum(r["correct_flexible"] for r in better)
        (tmp_path / "results/eval" / f"{arm}.json").write_text(json.dumps(d))
    m = write_report(params, [], tmp_path)
    md = (tmp_path / "reports/index.md").read_text()
    gained = sum(not r["correct_flexible"] for r in rows)
    assert gained >= 7  # 0/7 discordant one way: p = 2/128 < 0.05 / 3 arms (Holm)
    assert m["best_arm"] == "kd-teacher" and "**kd-teacher** beats the base student" in md


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
    write_report(params, attention_fixture(params), root)
    assert {rel: (root / rel).read_bytes() for rel in OUTPUTS} == first
    # a fresh interpreter (fresh matplotlib state, different hash seed) writes the same bytes elsewhere
    other = tmp_path_factory.mktemp("fresh")
    fabricate(other, params)
    (other / "in.json").write_text(json.dumps({"params": params, "attention": attention_fixture(params)}))
    code = ("import json,sys; from kd.report import write_report; d=json.load(open(sys.argv[1]+'/in.json'));"
            "write_report(d['params'], d['attention'], sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(other)], check=True, cwd=REPO,
                   env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                        "MPLCONFIGDIR": str(other / ".mpl")})
    assert {rel: (other / rel).read_bytes() for rel in OUTPUTS} == first
    assert not [p for p in (root / "reports").iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_missing_model_names_the_file(tmp_path, params):
    fabricate(tmp_path, params)
    (tmp_path / "results/eval/kd-teacher.json").unlink()
    with pytest.raises(KdError, match=r"results/eval/kd-teacher\.json: missing"):
        write_report(params, [], tmp_path)
    assert not (tmp_path / "reports/index.md").exists() and not (tmp_path / "metrics").exists()


def test_missing_samples_and_distill_name_the_file(tmp_path, params):
    fabricate(tmp_path, params)
    (tmp_path / "reports/eval/kd-none/samples.jsonl").unlink()
    with pytest.raises(ArtefactError, match=r"reports/eval/kd-none/samples\.jsonl"):
        write_report(params, [], tmp_path)
    fabricate(tmp_path, params)
    (tmp_path / "results/distill/teacher.json").unlink()
    with pytest.raises(ArtefactError, match=r"results/distill/teacher\.json"):
        write_report(params, [], tmp_path)


def test_inconsistent_inputs_rejected(tmp_path, params):
    fabricate(tmp_path, params)
    path = tmp_path / "results/eval/student.json"
    d = json.loads(path.read_text())
    d["correct_strict"] += 1  # stale metrics next to newer samples
    path.write_text(json.dumps(d))
    with pytest.raises(ArtefactError, match="correct_strict"):
        write_report(params, [], tmp_path)
    fabricate(tmp_path, params)
    d = json.loads(path.read_text())
    del d["ci95_flexible_high"]
    path.write_text(json.dumps(d))
    with pytest.raises(ArtefactError, match="ci95_flexible_high"):
        write_report(params, [], tmp_path)
    fabricate(tmp_path, params)
    s = tmp_path / "reports/eval/kd-none/samples.jsonl"
    rows = [json.loads(x) for x in s.read_text().splitlines()]
    rows[0]["id"] = 999  # evaluated on a different question than the student
    s.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ArtefactError, match="different questions"):
        write_report(params, [], tmp_path)


def test_no_attention_rows(tmp_path, params):
    fabricate(tmp_path, params)
    m = write_report(params, [], tmp_path)
    assert not (tmp_path / "reports/plots/attention.png").exists()
    assert json.loads((tmp_path / "reports/attention.json").read_text()) == []
    assert "## Attention" not in (tmp_path / "reports/index.md").read_text()


def test_attention_read_from_the_attention_stages(tmp_path, params):
    """The report reads the attention stages' per-arm files (kd.arms order) and loads no model; a missing or
    malformed file is named."""
    from kd.report import read_attention

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
