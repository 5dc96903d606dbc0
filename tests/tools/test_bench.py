"""`kd bench` on the tiny models: every figure is consistent with the measurements it is made of (a ratio is the
quotient of its stated rates, an exponent follows from its stated times, the table prints the figures of the
result, with their units); times themselves are never asserted."""

import math
import re

import pytest
import torch

from kd.tools.bench.speed import bench_decoding, bench_growth_decoding, machine
from kd.tools.bench.table import table


def test_bench_decoding_smoke(tiny_models):
    from kd.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(tiny_models / "student")
    model = load_model(tiny_models / "student", "float32", device="cpu")
    r = bench_decoding(model, tok, n=5, batch=3, max_new=8, b1_rows=3, repeats=1)
    d = r["2_decoder"]
    # float32: the decoder gives HF generate's batch-1 tokens on every compared row
    assert d["rows_equal_to_hf_batch1"] == d["rows_compared"] == 3 and d["first_difference_at_token"] == []
    c = r["1_ceiling"]
    assert c["tokens"] == 3 * 8
    assert c["decode_over_forward"] == pytest.approx(c["decode_tokens_per_s"] / c["forward_tokens_per_s"], rel=1e-12)
    tps = d["tokens_per_s"]
    assert all(v > 0 and math.isfinite(v) for v in tps.values()), tps
    assert d["vs_hf_batch1"] == pytest.approx(tps["ours"] / tps["hf_batch1"], rel=1e-12)
    assert d["vs_hf_fixed_batch"] == pytest.approx(tps["ours"] / tps["hf_fixed_batch"], rel=1e-12)
    assert 1 <= r["mean_response_tokens"] <= r["max_new_tokens"]  # a mean count of tokens, within the budget
    m = machine()
    assert m["cores"] >= 1 and m["torch"] == torch.__version__
    text = table({"machine": m, "size": "tiny", "dtype": "float32", "models": {"teacher": r, "student": r},
                  "dvc": {"status_seconds": 1.0}})
    # the table prints the result's own figures, rounded, with their unit (x for ratios)
    for label, value in (("decode / forward tokens/s", c["decode_over_forward"]),
                         ("decoder / HF generate, batch 1", d["vs_hf_batch1"]),
                         ("decoder / HF generate, batch 3", d["vs_hf_fixed_batch"])):
        row = next(line for line in text.splitlines() if f"| {label} |" in line)
        assert re.findall(r"\| (-?[0-9.]+)x (?=\|)", row)[:2] == [f"{value:.2f}"] * 2, row
    assert "| 2 | rows equal to HF batch 1 | 3/3" in text


def test_growth_smoke(tiny_models):
    """Item 6: the same decoder at 1x and 4x the questions; 4x the questions make at least as many tokens."""
    from kd.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(tiny_models / "student")
    model = load_model(tiny_models / "student", "float32", device="cpu")
    g = bench_growth_decoding(model, tok, n=2, batch=2, max_new=8)
    assert g["questions"] == [2, 8] and g["tokens"][1] >= g["tokens"][0] > 0  # the first 2 prompts are in both
    assert all(t > 0 for t in g["seconds"])
    # k in t ~ n^k, from the stated times at the stated question counts
    k = math.log(g["seconds"][1] / g["seconds"][0]) / math.log(g["questions"][1] / g["questions"][0])
    assert g["exponent"] == pytest.approx(k, rel=1e-12)
    r = bench_decoding(model, tok, n=3, batch=3, max_new=8, b1_rows=1, repeats=1)
    r["6_growth"] = g
    text = table({"machine": machine(), "size": "tiny", "dtype": "float32", "models": {"teacher": r, "student": r},
                  "dvc": {"status_seconds": 1.0}})
    row = next(line for line in text.splitlines() if "| 6 | teacher generation: 2 -> 8 questions" in line)
    assert f"{g['seconds'][0]:.1f} -> {g['seconds'][1]:.1f} s" in row and f"| {g['exponent']:.2f} |" in row, row


def test_dtypes_item_is_the_quotient_of_its_rates(tmp_path):
    """Item 8 at small shapes read from the folders' config.json: each ratio is bf16's GFLOP/s over float32's, the
    rates follow the shapes' FLOP count, and the table prints every ratio once under the right model."""
    import json

    from kd.tools.bench.dtypes import bench_dtypes, mlp_shapes
    from kd.tools.bench.table import dtype_rows, dtypes_table

    for role, (h, i) in {"teacher": (48, 96), "student": (32, 64)}.items():
        (tmp_path / role).mkdir()
        (tmp_path / role / "config.json").write_text(json.dumps({"hidden_size": h, "intermediate_size": i}))
    assert mlp_shapes(tmp_path) == {"teacher": (48, 96), "student": (32, 64)}
    r = bench_dtypes(tmp_path, decode_rows=4, train_rows=8, repeats=1)
    items = r["8_dtypes"]
    assert [(x["role"], x["op"], x["rows"]) for x in items] == [
        ("teacher", "forward", 4), ("teacher", "forward", 8), ("student", "forward", 4), ("student", "forward", 8),
        ("student", "grad_input", 8)]
    for x in items:
        g = x["gflops"]
        assert g["bfloat16"] > 0 and g["float32"] > 0
        assert math.isclose(x["bf16_over_float32"], g["bfloat16"] / g["float32"], rel_tol=1e-12)
    rows = dtype_rows(r)
    assert dtypes_table(r).splitlines()[2:] == rows
    assert len(rows) == 3
    fwd8 = next(line for line in rows if "forward matmul, 8 rows" in line)
    cells = [c.strip() for c in fwd8.split("|")]
    assert cells[3] == f"{items[1]['bf16_over_float32']:.2f}x" and cells[4] == f"{items[3]['bf16_over_float32']:.2f}x"
    grad = next(line for line in rows if "grad-input" in line)
    assert [c.strip() for c in grad.split("|")][3] == ""  # the teacher never trains
