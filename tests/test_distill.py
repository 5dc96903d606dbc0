"""kd.distill: which teacher responses are trained on (distill.response_filter) and the fine-tune control's examples."""

import pytest

from kd.distill import build_gold_examples, gold_text, select_responses
from kd.errors import KdError
from kd.prompting import chat_ids, render_question
from kd.tiny import build_tokenizer

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
