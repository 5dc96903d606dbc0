"""`kd bench` in a smoke way on the tiny models: the figures are there and consistent; times are never asserted."""

import torch

from kd.bench import bench_decoding, bench_growth_decoding, machine, table


def test_bench_decoding_smoke(tiny_models):
    from kd.loading import load_model, load_tokenizer

    tok = load_tokenizer(tiny_models / "student")
    model = load_model(tiny_models / "student", "float32", device="cpu")
    r = bench_decoding(model, tok, n=5, batch=3, max_new=8, b1_rows=3, repeats=1)
    d = r["2_decoder"]
    # float32: the decoder gives HF generate's batch-1 tokens on every compared row
    assert d["rows_equal_to_hf_batch1"] == d["rows_compared"] == 3 and d["first_difference_at_token"] == []
    assert r["1_ceiling"]["tokens"] == 3 * 8
    for k in ("vs_hf_batch1", "vs_hf_fixed_batch"):
        assert d[k] > 0
    m = machine()
    assert m["cores"] >= 1 and m["torch"] == torch.__version__
    text = table({"machine": m, "size": "tiny", "dtype": "float32", "models": {"teacher": r, "student": r},
                  "dvc": {"status_seconds": 1.0}})
    assert "| 2 | decoder / HF generate, batch 3 |" in text and "3/3" in text


def test_growth_smoke(tiny_models):
    """Item 6: the same decoder at 1x and 4x the questions; 4x the questions make at least as many tokens."""
    from kd.loading import load_model, load_tokenizer

    tok = load_tokenizer(tiny_models / "student")
    model = load_model(tiny_models / "student", "float32", device="cpu")
    g = bench_growth_decoding(model, tok, n=2, batch=2, max_new=8)
    assert g["questions"] == [2, 8] and g["tokens"][1] >= g["tokens"][0] > 0  # the first 2 prompts are in both
    assert all(t > 0 for t in g["seconds"]) and isinstance(g["exponent"], float)
    r = bench_decoding(model, tok, n=3, batch=3, max_new=8, b1_rows=1, repeats=1)
    r["6_growth"] = g
    text = table({"machine": machine(), "size": "tiny", "dtype": "float32", "models": {"teacher": r, "student": r},
                  "dvc": {"status_seconds": 1.0}})
    assert "| 6 | teacher generation: 2 -> 8 questions" in text
