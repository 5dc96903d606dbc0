"""eval@<model>: the real lm-eval path on tiny random models, plus the scoring logic on known responses."""

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM

from kd.config.params import parse
from kd.config.profiles import load as load_profile
from kd.core.errors import ArtefactError, KdError, ParamError
from kd.data.answers import parse_gold, score
from kd.data.prompting import render_question
from kd.eval import evaluate as ev
from kd.eval import lm_harness as lh
from kd.eval.questions import QUESTION_KEYS
from kd.models.tiny import build_tokenizer, save_tiny

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO / "tests" / "data" / "gsm8k" / "test.jsonl"
MAX_NEW = 8
FLAT_KEYS = {"accuracy_strict", "accuracy_flexible", "ci95_strict_low", "ci95_strict_high", "ci95_flexible_low",
             "ci95_flexible_high", "correct_strict", "correct_flexible", "n", "mean_response_tokens", "truncated"}
ROW_KEYS = {"id", "prompt", "response", "gold", "pred_strict", "pred_flexible", "correct_strict",
            "correct_flexible", "response_tokens", "truncated"}


def _params(**eval_overrides):
    p = load_profile("tiny", REPO)
    p["eval"].update({"limit": None, "max_new_tokens": MAX_NEW, "batch_size": 4, **eval_overrides})
    return p


def _eval_rows(n=4):
    rows = []
    with open(GSM8K) as f:
        for i, line in zip(range(n), f):
            r = json.loads(line)
            # ids deliberately not in file order: outputs must come back sorted by integer id
            rows.append({"id": [10, 2, 7, 1, 5, 3][i], "question": r["question"], "answer": r["answer"],
                         "gold": parse_gold(r["answer"])})
    return rows


def _write_eval(root, rows):
    p = root / "data" / "prepared" / "eval.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _make_adapter(student_dir, out_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    # init_lora_weights=False: random B as well as A, so the adapter really changes the model
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.mul_(20.0)
    model.save_pretrained(str(out_dir), safe_serialization=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalroot")
    save_tiny("tiny-teacher", root / "models" / "teacher")
    save_tiny("tiny-student", root / "models" / "student")
    _make_adapter(root / "models" / "student", root / "models" / "kd-none")
    _write_eval(root, _eval_rows())
    return root


def _reference(model_dir, prompts, max_new, dtype=torch.bfloat16, adapter=None):
    """Greedy continuations one prompt at a time with plain transformers, cut at <|im_end|>:
    a list of (text, number of generated tokens before <|im_end|>)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))  # unmerged, as trained and as eval loads it
    model.eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for prompt in prompts:
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=im_end,
                                 pad_token_id=tok.pad_token_id)
        new = gen[0, enc["input_ids"].shape[1]:].tolist()
        if im_end in new:
            new = new[:new.index(im_end)]
        out.append((tok.decode(new, skip_special_tokens=True), len(new)))
    return out


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------------- real lm-eval path


@pytest.mark.slow  # lm-eval end to end on tiny models
def test_student_end_to_end_matches_plain_transformers(root):
    p = _params(batch_size=1)  # batch 1: bit-for-bit the same computation as the reference
    s = ev.evaluate_model("student", parse(p), root=root, device="cpu")
    metrics_path = root / "results" / "eval" / "student.json"
    samples_path = root / "reports" / "eval" / "student" / "samples.jsonl"
    metrics = json.loads(metrics_path.read_text())
    rows = _read(samples_path)

    assert set(metrics) == FLAT_KEYS
    assert all(not isinstance(v, (dict, list)) for v in metrics.values())
    assert metrics["n"] == s["items"] == 4
    assert [r["id"] for r in rows] == [1, 2, 7, 10]
    assert all(set(r) == ROW_KEYS for r in rows)
    src = {r["id"]: r for r in _eval_rows()}
    for r in rows:
        assert r["prompt"] == render_question(src[r["id"]]["question"], p["prompting"]["instruction"])
        assert r["gold"] == src[r["id"]]["gold"]
        assert 0 <= r["response_tokens"] <= MAX_NEW
    # a random model scores nothing, and the summary agrees with the rows
    assert metrics["correct_strict"] == sum(r["correct_strict"] for r in rows) == 0
    assert metrics["accuracy_flexible"] == sum(r["correct_flexible"] for r in rows) / 4
    assert metrics["ci95_strict_low"] == 0.0 and 0 < metrics["ci95_strict_high"] < 1
    assert metrics["mean_response_tokens"] == sum(r["response_tokens"] for r in rows) / 4
    # a row is truncated when it ran to max_new_tokens without its stop token
    assert metrics["truncated"] == sum(r["truncated"] for r in rows)
    assert all(r["truncated"] == (r["response_tokens"] == MAX_NEW) for r in rows)
    assert s["tokens"] == sum(r["response_tokens"] for r in rows)

    # the chat-templated prompt, greedy decoding and max_gen_toks are what we asked for
    ref = _reference(root / "models" / "student", [r["prompt"] for r in rows], MAX_NEW)
    assert [(r["response"], r["response_tokens"]) for r in rows] == ref

    # results/eval/<arm>.jsonl (git-tracked): the same questions, exactly the per-question keys, from the same rows
    questions_path = root / "results" / "eval" / "student.jsonl"
    questions = _read(questions_path)
    assert [q["id"] for q in questions] == [r["id"] for r in rows]
    for q, r in zip(questions, rows):
        assert list(q) == sorted(QUESTION_KEYS)  # sorted keys: byte-stable
        assert (q["gold"], q["strict"], q["flexible"]) == (r["gold"], r["pred_strict"], r["pred_flexible"])
        assert (q["correct_strict"], q["correct_flexible"]) == (r["correct_strict"], r["correct_flexible"])
        assert (q["tokens"], q["truncated"]) == (r["response_tokens"], r["truncated"])
        assert all(isinstance(q[k], bool) for k in ("correct_strict", "correct_flexible", "truncated"))

    # byte-stable, no absolute paths
    before = metrics_path.read_bytes(), samples_path.read_bytes(), questions_path.read_bytes()
    ev.evaluate_model("student", parse(p), root=root, device="cpu")
    assert (metrics_path.read_bytes(), samples_path.read_bytes(), questions_path.read_bytes()) == before
    for b in before:
        assert str(root).encode() not in b and b"/tmp" not in b


@pytest.mark.slow  # lm-eval end to end on tiny models
def test_limit_and_teacher(root):
    s = ev.evaluate_model("teacher", parse(_params(limit=3)), root=root, device="cpu")
    rows = _read(root / "reports" / "eval" / "teacher" / "samples.jsonl")
    assert s["items"] == 3
    # limit takes the first N rows of the prepared split (file order), reported sorted by id
    assert [r["id"] for r in rows] == [2, 7, 10]


@pytest.mark.slow  # lm-eval end to end on tiny models
def test_kd_adapter_goes_through_peft(root):
    p = _params(batch_size=1)
    ev.evaluate_model("kd-none", parse(p), root=root, device="cpu")
    rows = _read(root / "reports" / "eval" / "kd-none" / "samples.jsonl")
    student = _read(root / "reports" / "eval" / "student" / "samples.jsonl")
    assert len(rows) == 4 and json.loads((root / "results" / "eval" / "kd-none.json").read_text())["n"] == 4
    prompts = [r["prompt"] for r in rows]
    ref = _reference(root / "models" / "student", prompts, MAX_NEW, adapter=root / "models" / "kd-none")
    assert [(r["response"], r["response_tokens"]) for r in rows] == ref
    # and the adapter is really applied: base model alone answers differently
    base = _reference(root / "models" / "student", prompts, MAX_NEW)
    assert ref != base
    if student:  # written by the student test when it ran first
        assert [(r["response"], r["response_tokens"]) for r in student] == base


def _stopping_model(model_dir, prompts):
    """A tiny student rebuilt so that <|im_end|> wins the argmax for some prompts (in the middle of a batch)
    but not others, with <|im_end|> missing from generation_config.eos_token_id."""
    from transformers import AutoModelForCausalLM

    save_tiny("tiny-student", model_dir, dtype=torch.float32)
    tok = build_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base_rows = model.lm_head.weight.detach().clone()
    free = _reference(model_dir, prompts, MAX_NEW, dtype=torch.float32)
    candidates = sorted({b for text, _ in free for b in tok(text, add_special_tokens=False)["input_ids"]})
    for t in candidates:  # deterministic search for a token whose logit row makes a mixed batch
        with torch.no_grad():
            model.lm_head.weight.copy_(base_rows)
            model.lm_head.weight[im_end] = 1.02 * base_rows[t]
        model.generation_config.eos_token_id = None
        model.save_pretrained(str(model_dir), safe_serialization=True)
        ref = _reference(model_dir, prompts, MAX_NEW, dtype=torch.float32)
        lens = [n for _, n in ref]
        if min(lens) < MAX_NEW // 2 and max(lens) == MAX_NEW:
            return ref
    pytest.fail("no token found that makes some rows stop early and others run to max_new_tokens")


def test_rows_stop_at_im_end_in_a_mixed_batch(tmp_path):
    root = tmp_path
    _write_eval(root, _eval_rows())
    p = _params(batch_size=4)
    p["student"]["dtype"] = "float32"
    prompts = [render_question(r["question"], p["prompting"]["instruction"]) for r in _eval_rows()]
    ref = _stopping_model(root / "models" / "student", prompts)
    ev.evaluate_model("student", parse(p), root=root, device="cpu")
    rows = {r["prompt"]: r for r in _read(root / "reports" / "eval" / "student" / "samples.jsonl")}
    assert [(rows[q]["response"], rows[q]["response_tokens"]) for q in prompts] == ref


def test_stop_token_ids():
    tok = build_tokenizer()
    ids = lh.stop_token_ids(tok, ["<|im_end|>", "<|endoftext|>", "</s>", "Question:"])
    assert ids == sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")})


# --------------------------------------------------------------------- scoring logic on known responses


class ReplayLM(LM):
    """An lm_eval LM that answers each doc with a canned response (keyed by doc id)."""

    def __init__(self, responses):
        super().__init__()
        self.responses = responses
        self.tokenizer = build_tokenizer()
        self.contexts = []

    def generate_until(self, requests, disable_tqdm=False):
        self.contexts += [r.args[0] for r in requests]
        return [self.responses[r.doc["id"]] for r in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self):
        return "replay"


KNOWN = [  # id, gold, response, (pred_strict, pred_flexible), (correct_strict, correct_flexible)
    (1, "1234", "So 1000 + 234 = 1,234 in total.\n#### 1,234.", ("1,234.", "1,234."), (True, True)),
    (2, "18", "She makes $18.", (None, "$18."), (False, True)),
    (3, "-3.5", "The change is -3.5\n#### -3.5", ("-3.5", "-3.5"), (True, True)),
    (4, "9", "First 7, then 9, so the answer is 12", (None, "12"), (False, False)),
    (5, "5", "#### 5\nWait, actually 6", ("5", "6"), (True, False)),
    (6, "42", "I do not know.", (None, None), (False, False)),
    (7, "1000", "#### $1,000", (None, "$1,000"), (False, True)),
]


def _known_root(tmp_path):
    rows = [{"id": i, "question": f"Question {i}?", "answer": f"... #### {g}", "gold": g}
            for i, g, *_ in reversed(KNOWN)]
    _write_eval(tmp_path, rows)
    return {i: resp for i, _, resp, *_ in KNOWN}


def _replay(monkeypatch, lm):
    """Every model eval would load answers from `lm` instead (lm-eval still does all the scoring)."""
    monkeypatch.setattr(ev, "make_lm", lambda *a, **k: lm)
    monkeypatch.setattr(ev, "check_model_files", lambda spec: None)


def test_scoring_known_responses_through_lm_eval(tmp_path, monkeypatch):
    responses = _known_root(tmp_path)
    lm = ReplayLM(responses)
    _replay(monkeypatch, lm)
    p = _params()
    s = ev.evaluate_model("student", parse(p), root=tmp_path)
    rows = _read(tmp_path / "reports" / "eval" / "student" / "samples.jsonl")
    assert [r["id"] for r in rows] == [k[0] for k in KNOWN]
    for r, (i, gold, resp, preds, correct) in zip(rows, KNOWN):
        assert (r["response"], r["gold"]) == (resp, gold)
        assert (r["pred_strict"], r["pred_flexible"]) == preds, i
        assert (r["correct_strict"], r["correct_flexible"]) == correct, i
        # lm-eval's scoring and kd.data.answers (used on teacher responses) agree
        mine = score(resp, gold)
        assert (mine["correct_strict"], mine["correct_flexible"]) == correct, i
    metrics = json.loads((tmp_path / "results" / "eval" / "student.json").read_text())
    assert (metrics["correct_strict"], metrics["correct_flexible"], metrics["n"]) == (3, 4, 7)
    assert metrics["accuracy_strict"] == 3 / 7 and s["accuracy_flexible"] == 4 / 7
    # zero-shot, chat-templated, the rendered prompt as the only user turn
    assert lm.contexts and all(c.startswith("<|im_start|>user\nQuestion ") and
                               c.endswith("<|im_end|>\n<|im_start|>assistant\n") for c in lm.contexts)
    assert all(c.count("<|im_start|>user") == 1 for c in lm.contexts)


def test_cross_check_fails_loudly(tmp_path):
    responses = _known_root(tmp_path)
    p = _params()
    rows = ev.load_eval_rows(tmp_path / "data" / "prepared" / "eval.jsonl")
    docs = lh.build_docs(rows, p["prompting"]["instruction"])
    results = lh.run_lm_eval(ReplayLM(responses), docs, max_new_tokens=8, batch_size=4, limit=None, seed=0)
    samples = results["samples"][lh.TASK_NAME]
    task = results["results"][lh.TASK_NAME]
    out = lh.rows_from_samples(samples)
    lh.check_against_lm_eval(out, task, len(KNOWN))
    with pytest.raises(KdError, match="reports exact_match,strict-match"):
        lh.check_against_lm_eval(out, {**task, "exact_match,strict-match": 0.5}, len(KNOWN))
    with pytest.raises(KdError, match="expected 8"):
        lh.check_against_lm_eval(out, task, 8)
    with pytest.raises(KdError, match="no sample for filter"):
        lh.rows_from_samples([s for s in samples if s["filter"] == "strict-match"])
    tampered = copy.deepcopy(samples)
    doc0 = tampered[0]["doc"]["id"]
    other = next(x for x in tampered[1:] if x["doc"]["id"] == doc0)
    other["resps"] = [["something else"]]
    with pytest.raises(KdError, match="filters disagree"):
        lh.rows_from_samples(tampered)
    with pytest.raises(KdError, match="two strict-match samples"):
        lh.rows_from_samples(samples + [samples[0]])


# ------------------------------------------------------------------------------------------- validation


def test_resolve_model():
    p = _params()
    t = ev.resolve_model("teacher", parse(p), "m")
    assert (t.pretrained, t.peft, t.dtype, t.trust_remote_code) == (Path("m/teacher"), None, "bfloat16", False)
    k = ev.resolve_model("kd-teacher", parse(p), "m")
    assert (k.pretrained, k.peft) == (Path("m/student"), Path("m/kd-teacher"))
    c = ev.resolve_model("student_cot", parse(p), "m")
    assert (c.pretrained, c.peft, c.prompt) == (Path("m/student"), None, "cot")
    f = ev.resolve_model("finetune", parse(p), "m")
    assert (f.pretrained, f.peft, f.prompt) == (Path("m/student"), Path("m/finetune"), "task")
    with pytest.raises(ParamError, match=r"arm.*allowed: teacher, student, student_cot, finetune, kd-none, kd-teacher"):
        ev.resolve_model("kd-bogus", parse(p))
    with pytest.raises(ParamError, match="not an arm"):
        ev.resolve_model("gpt", parse(p))


def test_missing_inputs_are_kd_errors(tmp_path, root):
    p = _params()
    with pytest.raises(ArtefactError, match="eval.jsonl"):
        ev.evaluate_model("student", parse(p), root=tmp_path)
    _write_eval(tmp_path, _eval_rows())
    with pytest.raises(ArtefactError, match="not a model folder"):
        ev.evaluate_model("student", parse(p), root=tmp_path)
    (tmp_path / "models").symlink_to(root / "models")
    with pytest.raises(ArtefactError, match="adapter"):
        ev.check_model_files(ev.resolve_model("kd-teacher", parse(p), tmp_path / "models"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q", "gold": "1"}\n{"id": 1, "question": "q", "gold": "2"}\n')
    with pytest.raises(ArtefactError, match="duplicate id 1"):
        ev.load_eval_rows(bad)


def _stage():
    spec = importlib.util.spec_from_file_location("stage_eval", REPO / "stages" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stage_rejects_bad_model_before_loading(monkeypatch):
    from click.testing import CliRunner

    import kd.harness.stage

    monkeypatch.setattr(kd.harness.stage, "load_config", lambda *a, **k: parse(_params()))
    called = []
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **k: called.append(a))
    res = CliRunner().invoke(_stage().main, ["nope"])
    assert isinstance(res.exception, ParamError) and "`arm` does not list 'nope'" in str(res.exception)
    assert "kd-teacher" in str(res.exception) and not called


def test_stage_prints_summary(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import kd.harness.stage

    responses = _known_root(tmp_path)
    monkeypatch.setattr(kd.harness.stage, "load_config", lambda *a, **k: parse(_params()))
    _replay(monkeypatch, ReplayLM(responses))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(_stage().main, ["teacher"])
    assert res.exit_code == 0, res.output
    assert re.search(r"^eval@teacher: 7 items, \d+ tokens; accuracy strict 0\.429.* \([\d.]+ s\)$", res.stdout, re.M)
    assert (tmp_path / "results" / "eval" / "teacher.json").exists()


# ------------------------------------------------------------------------------- evaluated = trained (7.1)


def test_evaluated_student_is_the_trained_one(tmp_path):
    """An adapter as small as the default's (median ||dW||/||W|| ~ 2.5e-4) reaches eval bit for bit: the evaluated
    model's logits equal the trained PEFT model's. The old path, a merge into bf16 weights, loses most of it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from kd.models.loading import load_model
    from kd.train.run import save_adapter

    models = tmp_path / "models"
    save_tiny("tiny-student", models / "student")  # bf16, like the default student
    torch.manual_seed(0)
    model = get_peft_model(load_model(models / "student", "bfloat16"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    ratios = []
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                w = mod.base_layer.weight.float()
                delta = (b @ a) * mod.scaling["default"]
                b.mul_(2.5e-4 * w.norm() / delta.norm())  # ||dW|| / ||W|| = 2.5e-4, as in the default run
                ratios.append(((b @ a) * mod.scaling["default"]).norm() / w.norm())
    assert ratios and all(abs(r - 2.5e-4) < 1e-6 for r in ratios)
    model.eval()
    x = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64]])
    with torch.no_grad():
        trained = model(input_ids=x).logits
    save_adapter(model, models / "kd-none")

    p = _params()
    lm = lh.make_lm(ev.resolve_model("kd-none", parse(p), models), batch_size=1, device="cpu")
    with torch.no_grad():
        evaluated = lm.model(input_ids=x).logits
    assert torch.equal(evaluated, trained)

    # what eval did before: merge into bf16. Most of the update rounds away (the test can fail on that path).
    merged = PeftModel.from_pretrained(load_model(models / "student", "bfloat16"),
                                       str(models / "kd-none")).merge_and_unload()
    base = load_model(models / "student", "bfloat16")
    q_merged = merged.model.layers[0].self_attn.q_proj.weight.float()
    q_base = base.model.layers[0].self_attn.q_proj.weight.float()
    assert (q_merged == q_base).float().mean() > 0.5  # most merged weights did not move at all
    with torch.no_grad():
        assert not torch.equal(merged(input_ids=x).logits, trained)


# ---------------------------------------------------------------- comparable to the lm-eval CLI (7.9)


@pytest.mark.slow  # lm-eval end to end on tiny models
def test_our_eval_equals_the_lm_eval_command_line(tmp_path):
    """Our eval of a tiny model equals `lm-eval run` of the same task file on the same rows: same responses,
    same per-question scores, same accuracies. (What the numbers are comparable to is this task file, zero-shot
    and chat-templated, not lm-eval's stock 5-shot gsm8k.)"""
    import subprocess
    import sys

    root = tmp_path / "proj"
    save_tiny("tiny-student", root / "models" / "student", dtype=torch.float32)
    rows = _eval_rows()
    _write_eval(root, rows)
    p = _params(batch_size=1)
    p["student"]["dtype"] = "float32"
    ev.evaluate_model("student", parse(p), root=root, device="cpu")
    ours = {r["id"]: r for r in _read(root / "reports" / "eval" / "student" / "samples.jsonl")}

    task_dir = lh.write_task_dir(lh.build_docs(rows, p["prompting"]["instruction"]), tmp_path / "task", MAX_NEW)
    out = tmp_path / "cli"
    lm_eval_cli = Path(sys.executable).parent / "lm-eval"
    res = subprocess.run([str(lm_eval_cli), "run", "--model", "hf", "--model_args",
                          f"pretrained={root / 'models' / 'student'}", "dtype=float32", "--tasks", lh.TASK_NAME,
                          "--include_path", str(task_dir), "--apply_chat_template", "--batch_size", "1",
                          "--log_samples", "--output_path", str(out), "--seed", "0", "--device", "cpu"],
                         capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    samples = [json.loads(line) for f in sorted(out.rglob(f"samples_{lh.TASK_NAME}_*.jsonl"))
               for line in f.read_text().splitlines()]
    assert samples, list(out.rglob("*"))
    theirs = lh.rows_from_samples(samples)
    assert [r["id"] for r in theirs] == sorted(ours)
    for r in theirs:
        o = ours[r["id"]]
        assert (r["response"], r["correct_strict"], r["correct_flexible"]) == \
            (o["response"], o["correct_strict"], o["correct_flexible"]), r["id"]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][lh.TASK_NAME]
    metrics = json.loads((root / "results" / "eval" / "student.json").read_text())
    assert results["exact_match,strict-match"] == metrics["accuracy_strict"]
    assert results["exact_match,flexible-extract"] == metrics["accuracy_flexible"]
