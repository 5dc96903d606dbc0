"""Regression tests for the original code's alignment defects (../shared/reference/upstream.md, defects 1-3).

A "context-free" model (attention and MLP outputs zeroed, so each position's logits depend only on its own
token) makes alignment observable: teacher and student then produce identical distributions exactly when
they are compared at the same response token — whatever the priming prefix length."""

import json

import numpy as np
import pytest
import torch

from kd.core.errors import ArtefactError
from kd.data.prompting import load_strategies
from kd.teacher.responses import Generation, run_generation
from kd.teacher.signal import SignalWriter, capture, tensor_sha256
from kd.teacher.signal_reader import TeacherSignal
from kd.train.distill import example_loss
from kd.train.examples import build_examples

INSTRUCTION = "End with '#### <number>'."


@pytest.fixture(scope="module")
def context_free(tmp_path_factory, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models / "teacher", dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    path = tmp_path_factory.mktemp("ctxfree")
    model.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(tiny_models / "teacher")
    tok.save_pretrained(path)
    model.eval()
    return model, tok, path


@pytest.fixture(scope="module")
def pipeline(context_free, tmp_path_factory):
    """Teacher responses under the long `teacher` prefix, stored as hidden states, read back verified."""
    model, tok, path = context_free
    rows = [{"id": i, "question": f"Tom has {i} apples and buys {i + 3} more. How many now?",
             "answer": f"#### {2 * i + 3}", "gold": str(2 * i + 3)} for i in (10, 2, 1)]  # "10" < "2" as strings
    template = load_strategies("strategies.yaml")["teacher"]
    work = tmp_path_factory.mktemp("work")
    responses = run_generation(model, tok, rows, Generation(template, INSTRUCTION, 12, 2, work, "fp"))
    for k, r in enumerate(responses):  # distinct lengths per id, so any mis-pairing changes shapes
        r["response_ids"] = r["response_ids"][: 6 + 2 * k]
    out = tmp_path_factory.mktemp("signal")
    writer = SignalWriter(out, "hidden", shard_rows=10)  # several shards
    for r in responses:
        tensors, _ = capture(model, r["prompt_ids"], r["response_ids"], "hidden", 0)
        writer.add(r["id"], r["response_ids"], tensors)
    writer.close({"vocab_size": model.config.vocab_size,
                  "output_layer": {"sha256": tensor_sha256(
                      model.lm_head.weight)}})
    questions = {r["id"]: r for r in rows}
    return model, tok, path, responses, out, questions


def test_responses_and_signal_are_in_integer_id_order(pipeline):
    _, _, path, responses, out, _ = pipeline
    assert [r["id"] for r in responses] == [1, 2, 10]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["id"] for e in manifest["examples"]] == [1, 2, 10]


def test_string_sorted_manifest_is_refused(pipeline, tmp_path):
    """Defect 1: keys read back in string order ("1", "10", "2") must never pair silently."""
    _, _, path, responses, out, _ = pipeline
    import shutil

    bad = tmp_path / "signal"
    shutil.copytree(out, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["examples"].sort(key=lambda e: str(e["id"]))
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError, match="ids"):
        TeacherSignal(bad, responses, path)


def test_each_id_reads_back_its_own_rows(pipeline):
    model, _, path, responses, out, _ = pipeline
    signal = TeacherSignal(out, responses, path)
    for r in responses:
        seq = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        p, n = len(r["prompt_ids"]), len(r["response_ids"])
        own = model(seq).logits[0, p - 1:p + n - 1].float()
        torch.testing.assert_close(signal.logits(r["id"]), own, rtol=0, atol=1e-5)


def test_kd_compares_the_same_response_tokens_despite_the_prefix(pipeline):
    """Defect 2: the teacher's prompt carries a long prefix the student never sees. With a context-free
    model as both teacher and student, the divergence is zero iff positions are aligned per response token."""
    model, tok, path, responses, out, questions = pipeline
    signal = TeacherSignal(out, responses, path)
    examples, skipped = build_examples(responses, questions, tok, INSTRUCTION, 4096, "teacher")
    assert not skipped and [e.id for e in examples] == [1, 2, 10]
    for ex, r in zip(examples, responses):
        assert len(r["prompt_ids"]) - ex.prompt_len > 100  # the prefix really shifts the teacher's positions
        with torch.no_grad():
            loss = example_loss(model, ex, lambda a, b, i=ex.id: signal.logits(i, a, b), 0.0, 2.0,
                                "reverse_kl", "teacher", chunk=5)
        assert loss["kd"].item() < 1e-6
        # the same computation shifted by one token is far from zero: the test can fail
        shifted = lambda a, b, i=ex.id: signal.logits(i, min(a + 1, ex.response_len - 1),  # noqa: E731
                                                      min(b + 1, ex.response_len))
        with torch.no_grad():
            off = example_loss(model, ex, lambda a, b: _pad(shifted(a, b), b - a), 0.0, 2.0, "reverse_kl",
                               "teacher", chunk=ex.response_len)
        assert off["kd"].item() > 1e-3


def _pad(x, n):
    return torch.cat([x, x[-1:].expand(n - x.shape[0], -1)]) if x.shape[0] < n else x


def test_labels_are_next_tokens_and_prompt_is_masked(pipeline):
    """Defect 3: CE must score position t's logits against token t+1, over response tokens only."""
    model, tok, path, responses, out, questions = pipeline
    examples, _ = build_examples(responses, questions, tok, INSTRUCTION, 4096, "teacher")
    ex = examples[0]
    with torch.no_grad():
        got = example_loss(model, ex, lambda a, b: torch.zeros(b - a, model.config.vocab_size), 1.0, 1.0,
                           "reverse_kl", "teacher", chunk=3)["ce"].item()
        logits = model(torch.tensor([ex.input_ids])).logits[0].double().numpy()
    p, n = ex.prompt_len, ex.response_len
    ref = []
    for j in range(n):
        z = logits[p + j - 1]
        lse = np.log(np.exp(z - z.max()).sum()) + z.max()
        ref.append(lse - z[ex.input_ids[p + j]])
    assert abs(got - float(np.mean(ref))) < 1e-5
    unshifted = np.mean([np.log(np.exp(logits[p + j] - logits[p + j].max()).sum()) + logits[p + j].max()
                         - logits[p + j][ex.input_ids[p + j]] for j in range(n - 1)])
    assert abs(got - unshifted) > 1e-3


def test_truncation_keeps_teacher_rows_paired(pipeline):
    _, tok, _, responses, _, questions = pipeline
    examples, _ = build_examples(responses, questions, tok, INSTRUCTION, 4096, "teacher")
    p = examples[0].prompt_len
    short, skipped = build_examples(responses, questions, tok, INSTRUCTION, p + 3, "teacher")
    assert all(e.response_len == 3 and len(e.input_ids) == p + 3 for e in short if e.prompt_len == p)
    none_fit, skipped = build_examples(responses, questions, tok, INSTRUCTION, 16, "teacher")
    assert none_fit == [] and skipped == [1, 2, 10]
