"""`kd plan`: how many eval questions a detectable difference needs, from the measured disagreement of the committed
per-question results (or report.planning_disagreement), and what they cost in time on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kd.core.errors import ArtefactError, KdError
from kd.core.io import read_json, read_jsonl
from kd.eval.comparisons import families

if TYPE_CHECKING:
    from kd.config.params import Params


def measured_disagreement(params: Params, root: str | Path = ".") -> tuple[float, str] | None:
    """The largest disagreement (share of questions one arm got right and the other wrong, primary metric) among
    the first comparison family whose committed results/eval/<arm>.jsonl files all exist, and what it was measured
    on; None when no family has them. The largest, so the questions planned on it suffice for every pair."""
    from kd.eval.stats import paired_comparison

    root = Path(root)
    primary = params.report.primary_metric
    key = f"correct_{primary}"
    for fam in families(params.prompting.strategies):
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


def seconds_per_question(params: Params, root: str | Path = ".") -> tuple[dict[str, float], str]:
    """Seconds one eval question takes per arm on this machine: results/eval/<arm>.json's `seconds` / `n` where the
    eval stage recorded its time, else reports/bench.json's decoding speed (`kd bench`, tokens/s of the teacher's or
    the student's model) over the arm's mean response tokens. Returns ({arm: seconds}, where they came from)."""
    from kd.config.arms import arm_names, resolve

    root = Path(root)
    strategies = params.prompting.strategies
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


def plan(params: Params, mde: float, disagreement: float | None = None, root: str | Path = ".",
         seconds: float | None = None) -> list[str]:
    """`kd plan`: how many paired eval questions a detectable difference `mde` (a fraction) needs at 80 % power and
    two-sided 0.05 (exact McNemar), and what evaluating them costs here. The disagreement: the given one, else the
    committed results' measured one (measured_disagreement), else report.planning_disagreement."""
    from kd.eval.stats import mcnemar_sample_size

    if disagreement is not None:
        where = "given (--disagreement)"
    else:
        measured = measured_disagreement(params, root)
        if measured is not None and measured[0] > 0:
            disagreement, where = measured[0], f"measured: the largest of the committed results ({measured[1]})"
        else:
            disagreement = params.report.planning_disagreement
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
             f"(prepare.eval_size is {params.prepare.eval_size})."]
    if seconds is not None:
        per, source = {"every arm": float(seconds)}, "given (--seconds-per-question)"
    else:
        per, source = seconds_per_question(params, root)
    if not per:
        lines.append("cost: unknown here (no results/eval/<arm>.json with `seconds`, no reports/bench.json); pass "
                     "--seconds-per-question.")
        return lines
    from kd.config.arms import arm_names

    arms = len(arm_names(params.prompting.strategies))
    total = sum(per.values()) * n * (arms if "every arm" in per else 1)
    each = ", ".join(f"{a} {s:.2f} s" for a, s in per.items())
    lines.append(f"cost on this machine: about {total / 3600:.1f} h of eval decoding for {n} questions "
                 f"({each} per question; from {source}"
                 + (f"; {arms} arms" if "every arm" in per else f"; arms: {', '.join(per)}") + "). "
                 "The teacher, logits and distill stages do not grow with the eval questions.")
    return lines
