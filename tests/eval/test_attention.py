"""kd.eval.attention: the statistics against an independent pure-Python float64 reference on hand-built maps, and
end to end on a tiny random student plus a LoRA adapter made here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kd.core.errors import KdError
from kd.eval import attention as A

# ------------------------------------------------------------------ independent reference (loops, math.log)


def ref_head(m, threshold=0.1, k=5):
    """One head's (q, q) causal map as nested lists -> dict of stats, the plain definitions."""
    q = len(m)
    ent, entn, selff, above, cells, topk = [], [], [], 0, 0, []
    for i in range(q):
        row = [float(m[i][j]) for j in range(i + 1)]  # allowed keys only
        s = sum(row)
        row = [x / s for x in row]
        n = i + 1
        if n > k:
            topk.append(sum(sorted(row, reverse=True)[:k]))
        if n < 2:
            continue
        h = -sum(x * math.log(x) for x in row if x > 0)
        ent.append(h)
        entn.append(h / math.log(n))
        selff.append(row[i])
        above += sum(1 for x in row if x > threshold)
        cells += n
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {"entropy": mean(ent), "entropy_norm": mean(entn), "self_focus": mean(selff),
            "density": above / cells if cells else float("nan"), "top5_mass": mean(topk)}


def ref_similarity(m1, m2):
    q = len(m1)
    x, y = [], []
    for i in range(1, q):
        s1, s2 = sum(m1[i][: i + 1]), sum(m2[i][: i + 1])
        x += [m1[i][j] / s1 for j in range(i + 1)]
        y += [m2[i][j] / s2 for j in range(i + 1)]
    dot = sum(a * b for a, b in zip(x, y))
    return dot / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))


def random_causal(rng, heads, q, peak=1.0):
    """Random row-stochastic causal maps: softmax of scaled normals over the visible keys."""
    logits = rng.normal(size=(heads, q, q)) * peak
    logits = np.where(np.tril(np.ones((q, q), bool)), logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def uniform_causal(q):
    return np.tril(np.ones((q, q))) / np.arange(1, q + 1)[:, None]


# ------------------------------------------------------------------ hand-built maps, known answers


def test_uniform_map_known_values():
    q = 12
    st = A.head_stats(uniform_causal(q))
    rows = range(1, q)  # row 0 (a single visible key) is excluded
    assert st["entropy"][0] == pytest.approx(sum(math.log(i + 1) for i in rows) / (q - 1), abs=1e-12)
    assert st["entropy_norm"][0] == pytest.approx(1.0, abs=1e-12)  # uniform over what it may see
    assert st["self_focus"][0] == pytest.approx(sum(1 / (i + 1) for i in rows) / (q - 1), abs=1e-12)
    # weights 1/(i+1) > 0.1 for i+1 <= 9: rows 1..8 all above, rows 9..11 none above
    above = sum(i + 1 for i in range(1, 9))
    assert st["density"][0] == pytest.approx(above / sum(i + 1 for i in rows), abs=1e-12)
    assert st["top5_mass"][0] == pytest.approx(np.mean([5 / (i + 1) for i in range(5, q)]), abs=1e-12)


def test_one_hot_diagonal_and_first_key():
    q = 7
    eye = np.eye(q)
    st = A.head_stats(eye)
    assert st["entropy"][0] == 0.0 and st["entropy_norm"][0] == 0.0
    assert st["self_focus"][0] == 1.0
    assert st["density"][0] == pytest.approx((q - 1) / sum(i + 1 for i in range(1, q)))
    assert st["top5_mass"][0] == pytest.approx(1.0)
    sink = np.zeros((q, q))
    sink[:, 0] = 1.0  # every query on the first token ("attention sink")
    st = A.head_stats(sink)
    assert st["self_focus"][0] == 0.0 and st["entropy"][0] == 0.0
    # the sink map and the diagonal share no informative entry
    assert A.layer_similarity(eye, sink)[0] == pytest.approx(0.0)
    assert A.layer_similarity(eye, eye)[0] == pytest.approx(1.0)


def test_masked_zeros_are_not_counted():
    """The original's "sparsity" = fraction of the whole q x q map above 0.1, masked zeros included.
    For a uniform 4x4 causal map every visible weight is >= 0.25: density must be 1."""
    m = uniform_causal(4)
    assert A.head_stats(m)["density"][0] == 1.0
    assert (m > 0.1).mean() == pytest.approx(10 / 16)  # what the original would have reported


@pytest.mark.parametrize("q,peak", [(2, 1.0), (6, 0.5), (17, 2.0), (40, 4.0)])
def test_random_maps_match_reference(q, peak):
    rng = np.random.default_rng(q)
    maps = random_causal(rng, 3, q, peak)
    st = A.head_stats(maps)
    for h in range(3):
        ref = ref_head(maps[h].tolist())
        for key, val in ref.items():
            if math.isnan(val):
                assert math.isnan(st[key][h]), key
            else:
                assert st[key][h] == pytest.approx(val, rel=1e-12, abs=1e-12), key
    maps2 = random_causal(rng, 3, q, peak)
    sim = A.layer_similarity(maps, maps2)
    for h in range(3):
        assert sim[h] == pytest.approx(ref_similarity(maps[h].tolist(), maps2[h].tolist()), rel=1e-12)


def test_rows_renormalised_and_leaks_rejected():
    rng = np.random.default_rng(0)
    m = random_causal(rng, 2, 9)
    noisy = (m * 1.004).astype(np.float32)  # half-precision rows need not sum to 1
    a, b = A.head_stats(m), A.head_stats(noisy)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7)
    leak = m.copy()
    leak[0, 2, 5] = 0.3  # weight on a future key: mask does not match the model
    with pytest.raises(KdError, match="masked keys"):
        A.head_stats(leak)


def test_summarise_averages_heads_then_prompts_equally():
    rng = np.random.default_rng(1)
    prompts = [[random_causal(rng, 2, q) for _ in range(3)] for q in (5, 11)]  # 2 prompts x 3 layers x 2 heads
    out = A.summarise(prompts)
    assert [r["layer"] for r in out] == [0, 1, 2]
    assert out[0]["similarity"] is None
    for li in range(3):
        per = [ref_head(p[li][h].tolist()) for p in prompts for h in range(2)]
        for key in ("entropy", "entropy_norm", "self_focus", "density", "top5_mass"):
            # undefined values (top-5 mass of the 5-token prompt: no row has more than 5 keys) are skipped
            assert out[li][key] == pytest.approx(np.nanmean([r[key] for r in per]), rel=1e-12)
        if li:
            sims = [ref_similarity(p[li - 1][h].tolist(), p[li][h].tolist()) for p in prompts for h in range(2)]
            assert out[li]["similarity"] == pytest.approx(np.mean(sims), rel=1e-12)
    # HF layout (batch=1, heads, q, k) is accepted
    assert A.summarise([[m[None] for m in prompts[0]]])[1]["entropy"] == pytest.approx(
        A.summarise([prompts[0]])[1]["entropy"])


# ------------------------------------------------------------------ end to end on a tiny student + adapter


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kd.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("attn")
    save_tiny("tiny-student", root / "models/student")
    base = AutoModelForCausalLM.from_pretrained(str(root / "models/student"), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                                                 lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would make the adapter a no-op
        for name, prm in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                prm.copy_(0.5 * torch.randn(prm.shape, generator=gen))
    peft_model.save_pretrained(str(root / "models/kd-none"))
    with torch.no_grad():  # the fine-tune control: another adapter
        for name, prm in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                prm.mul_(-1.0)
    peft_model.save_pretrained(str(root / "models/finetune"))
    (root / "data/prepared").mkdir(parents=True)
    rows = [{"id": i, "question": f"Tom has {i + 3} apples and eats {i}. How many are left?", "answer": "x",
             "gold": "3"} for i in range(3)]
    (root / "data/prepared/eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_arm_attention_end_to_end(tiny_root):
    from kd.config.arms import student_arms

    def rows():  # what the attention stages write, one arm each, in report order
        return [{"model": arm, **r} for arm in student_arms(["none"])
                for r in A.arm_attention(arm, ["none"], 2, "End with '#### <number>'.", dtype="float32",
                                         root=tiny_root)]

    first = rows()
    # the student arms (no teacher, no student_cot: same weights as student); tiny student has 2 layers
    assert [(r["model"], r["layer"]) for r in first] == [("student", 0), ("student", 1), ("finetune", 0),
                                                         ("finetune", 1), ("kd-none", 0), ("kd-none", 1)]
    for r in first:
        assert 0 < r["entropy_norm"] <= 1 and 0 <= r["self_focus"] <= 1 and 0 < r["density"] <= 1
        assert 0 < r["top5_mass"] <= 1 and r["entropy"] > 0
        assert (r["similarity"] is None) == (r["layer"] == 0)
    # the adapter changed the maps (it targets q/k projections)
    assert first[0]["entropy"] != pytest.approx(first[4]["entropy"], rel=1e-6)
    # deterministic
    assert rows() == first
    # no prompts: nothing loaded, nothing summarised; more prompts than eval questions: named
    assert A.arm_attention("student", ["none"], 0, "x", root=tiny_root / "nowhere") == []
    with pytest.raises(KdError, match="attention_prompts = 4"):
        A.arm_attention("student", ["none"], 4, "x", dtype="float32", root=tiny_root)


def test_prompts_and_adapter_match_eval_path(tiny_root):
    import torch
    from peft import PeftModel

    from kd.data.prompting import chat_ids, render_question
    from kd.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(tiny_root / "models/student")
    q = "How many?"
    ids = A.render_prompt(tok, q, "Say '#### n'.")
    assert ids == chat_ids(tok, render_question(q, "Say '#### n'."))
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\nHow many?\nSay '#### n'.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")

    model = A.load_for_attention("kd-none", tiny_root / "models", dtype="float32", strategies=["none"])
    assert model.config._attn_implementation == "eager"
    unmerged = PeftModel.from_pretrained(load_model(tiny_root / "models/student", "float32",
                                                    attn_implementation="eager"),
                                         str(tiny_root / "models/kd-none"))
    x = torch.tensor([ids])
    with torch.no_grad():  # the student arm exactly as trained and evaluated: adapter unmerged, same bits
        assert torch.equal(model(x).logits, unmerged(x).logits)


def test_missing_adapter_and_wrong_model(tiny_root):
    from kd.core.errors import ArtefactError

    with pytest.raises(ArtefactError, match="kd-teacher"):
        A.load_for_attention("kd-teacher", tiny_root / "models", dtype="float32", strategies=["none", "teacher"])
    with pytest.raises(KdError, match="student arms"):
        A.load_for_attention("teacher", tiny_root / "models", dtype="float32", strategies=["none"])


def test_sdpa_model_rejected(tiny_root):
    from kd.models.loading import load_model

    model = load_model(tiny_root / "models/student", "float32", attn_implementation="sdpa")
    try:
        out = A.model_attention(model, [[1, 2, 3, 4]])
    except KdError as e:
        assert "eager" in str(e)
    else:  # some transformers versions fall back to eager when attentions are requested
        assert len(out) == 2


@pytest.mark.slow  # runs the attention stage for every arm
def test_attention_stage_records_its_environment(tiny_root):
    """The attention stages write environment/attention-<arm>.json beside their statistics, like every model stage."""
    import shutil
    from pathlib import Path

    import yaml
    from stage_runner import in_process

    from kd.config.profiles import load

    project = Path(__file__).resolve().parents[2]
    p = load("tiny", project)
    p["prompting"]["strategies"], p["report"]["attention_prompts"] = ["none"], 2
    (tiny_root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    shutil.copy(project / "strategies.yaml", tiny_root / "strategies.yaml")
    for arm in ("student", "kd-none"):
        in_process(tiny_root, "attention", arm)
        env = json.loads((tiny_root / f"environment/attention-{arm}.json").read_text())
        assert env["stage"] == f"attention-{arm}" and env["torch"]["threads"] >= 1
        assert [r["model"] for r in json.loads((tiny_root / f"reports/attention/{arm}.json").read_text())] == [arm] * 2
