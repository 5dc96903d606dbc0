"""kd.train.distill: which teacher responses are trained on (distill.response_filter) and the fine-tune control's examples."""

import pytest

from kd.core.errors import KdError
from kd.data.prompting import chat_ids, render_question
from kd.models.tiny import build_tokenizer
from kd.train.examples import build_gold_examples, gold_text, select_responses

RESPONSES = [
    {"id": 1, "finished": True, "correct_strict": True},
    {"id": 2, "finished": True, "correct_strict": False},
    {"id": 3, "finished": False, "correct_strict": False},
    {"id": 4, "finished": False, "correct_strict": True},  # a "#### N" line mid-way, then cut off: not kept
]


@pytest.mark.parametrize("rule,ids", [("all", [1, 2, 3, 4]), ("finished", [1, 2]), ("correct", [1])])
def test_response_filter(rule, ids):
    assert [r["id"] for r in select_responses(RESPONSES, rule)] == ids


def test_response_filter_rejects_unknown_rule():
    with pytest.raises(KdError, match="allowed: all, finished, correct"):
        select_responses(RESPONSES, "best")


def test_gold_examples_are_prompt_then_gold_solution_then_eos():
    tok = build_tokenizer()
    qs = [{"id": 9, "question": "Two plus two?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
          {"id": 3, "question": "One plus one?", "answer": "1+1=<<1+1=2>>2\n#### 2"}]
    examples, skipped = build_gold_examples(qs, tok, "Answer '#### n'.", max_length=512)
    assert [e.id for e in examples] == [3, 9] and skipped == []
    for e in examples:
        q = next(q for q in qs if q["id"] == e.id)
        prompt = chat_ids(tok, render_question(q["question"], "Answer '#### n'."))
        target = tok(gold_text(q["answer"]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert e.input_ids == prompt + target and e.prompt_len == len(prompt) and e.response_len == len(target)
        assert "<<" not in tok.decode(e.input_ids[e.prompt_len:])  # calculator annotations removed
    # a prompt that fills max_length is skipped, not truncated into nothing
    short, skipped = build_gold_examples(qs, tok, "Answer '#### n'.", max_length=len(prompt))
    assert short == [] and skipped == [3, 9]


@pytest.mark.slow
def test_control_is_the_kd_arm_minus_the_teacher(tmp_path):
    """Issue 19: the fine-tune control shares every setting of the KD arms (optimizer, batch, schedule, examples
    and their order, seed, dropout masks) except the teacher term: its first step's gradient equals the KD arm's
    CE-term gradient bit for bit, while the KD arm's whole gradient differs (the teacher term is there)."""
    import torch

    from kd.config.params import load_config
    from kd.core.io import read_jsonl
    from kd.train.distill import epoch_order, example_loss, pass_seed
    from kd.train.examples import build_gold_examples
    from kd.train.inputs import load_kd_inputs
    from kd.train.qlora import make_optimizer
    from kd.train.run import StudentRun
    from tests.stage_runner import in_process, tiny_copy

    def edit(p):
        p["distill"].update(hard_target="gold", response_filter="all", batch_size=2, optimizer="adamw", lr=1e-3)

    tiny_copy(tmp_path, ["none"], edit)
    for stage, *args in (("prepare",), ("model", "teacher"), ("model", "student"), ("teacher", "none"),
                         ("logits", "none")):
        in_process(tmp_path, stage, *args)
    c = load_config(tmp_path / "params.yaml", tmp_path)
    kd_run, ctl_run = StudentRun.of(c, tmp_path), StudentRun.of(c, tmp_path, control=True)
    # one run object: the control is the KD arms' run, every setting shared (student, optimizer, batch size, schedule,
    # LoRA, alpha, temperature, seed, instruction), except the teacher-only ones
    assert ctl_run.varied(hard_target=kd_run.cfg.hard_target) == kd_run
    assert ctl_run.cfg.hard_target == "gold" and ctl_run.cfg.optimizer == "adamw" and ctl_run.cfg.batch_size == 2
    kd_cfg, ctl_cfg = kd_run.cfg, ctl_run.cfg
    instr, ml = c.prompting.instruction, kd_cfg.max_length
    inputs = load_kd_inputs(tmp_path, "none", False)
    _, kd_ex, _ = inputs.examples(kd_cfg.response_filter, instr, ml, kd_cfg.hard_target)
    ctl_ex, _ = build_gold_examples(read_jsonl(tmp_path / "data/prepared/transfer.jsonl"), inputs.tokenizer, instr, ml)
    assert [e.id for e in kd_ex] == [e.id for e in ctl_ex] and len(kd_ex) > 2
    assert [e.gold_ids for e in kd_ex] == [e.gold_ids for e in ctl_ex]  # the same CE targets
    for epoch in range(kd_cfg.epochs):  # the same seeded order (it depends on the count and the seed only)
        assert epoch_order(len(kd_ex), c.seed, epoch) == epoch_order(len(ctl_ex), c.seed, epoch)

    first = epoch_order(len(kd_ex), c.seed, 0)[0]
    grads = {}
    for arm, ex, teacher, part in (("kd-ce", kd_ex[first], inputs.teacher_for(kd_ex[first].id), "ce"),
                                   ("kd", kd_ex[first], inputs.teacher_for(kd_ex[first].id), "loss"),
                                   ("control", ctl_ex[first], None, "loss")):
        model = ctl_run.model()
        model.train()
        assert type(make_optimizer([q for q in model.parameters() if q.requires_grad], ctl_cfg)).__name__ == "AdamW"
        losses = example_loss(model, ex, teacher, c.alpha, c.temperature, kd_cfg.loss, "gold",
                              kd_cfg.kd_chunk, inputs.vocab["kd_width"], pass_seed(c.seed, 0, ex.id))
        (c.alpha * losses["ce"] if part == "ce" else losses["loss"]).backward()
        grads[arm] = [q.grad.clone() for q in model.parameters() if q.requires_grad and q.grad is not None]
    assert len(grads["control"]) == len(grads["kd-ce"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads["control"], grads["kd-ce"]))
    assert not all(torch.equal(a, b) for a, b in zip(grads["kd"], grads["kd-ce"]))
