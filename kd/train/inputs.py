"""What a KD run on one strategy's teacher responses reads, checked and built in one place for distill@<strategy>,
`kd tune`'s trials and `kd select targets`: the teacher's responses, the transfer questions, the teacher signal
(stored hidden states -> logits), the teacher/student vocabulary check, the student's tokenizer, and the training
examples under a response filter and hard target. Every artefact check runs here, before any weights load.

Its own module, not kd/train/run.py: the fine-tune control trains through kd.train.run without a teacher, so it must not
depend on the teacher signal's code (dvc.yaml deps are exactly the modules a stage imports)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kd.core.io import read_jsonl
from kd.models.vocab import check_same_vocab
from kd.teacher.signal_reader import TeacherSignal
from kd.train.examples import Example, build_examples, select_responses


@dataclass
class KdInputs:
    responses: list[dict]          # data/teacher/<strategy>/responses.jsonl
    questions: dict[int, dict]     # data/prepared/transfer.jsonl by id
    signal: TeacherSignal
    vocab: dict                    # kd.models.vocab.check_same_vocab: kd_width, ...
    tokenizer: Any                 # the student's

    def teacher_for(self, example_id: int) -> Callable[[int, int], object]:
        """The teacher's logits for one example's response rows [a, b) (kd.train.distill.train's `teacher_for`)."""
        return lambda a, b: self.signal.logits(example_id, a, b)

    def examples(self, response_filter: str, instruction: str, max_length: int,
                 hard_target: str) -> tuple[list[dict], list[Example], list[int]]:
        """(responses kept by the filter, training examples, ids skipped because the prompt fills max_length)."""
        kept = select_responses(self.responses, response_filter)
        examples, skipped = build_examples(kept, self.questions, self.tokenizer, instruction, max_length, hard_target)
        return kept, examples, skipped


def load_kd_inputs(root: str | Path, strategy: str, trust_remote_code: bool) -> KdInputs:
    """Read and check strategy `strategy`'s teacher responses and signal against the transfer questions and the
    teacher/student pair under `root` (the project root)."""
    from kd.models.loading import load_tokenizer  # looked up per call, like the stages do (tests trap early loads)

    root = Path(root)
    responses = read_jsonl(root / f"data/teacher/{strategy}/responses.jsonl")
    questions = {r["id"]: r for r in read_jsonl(root / "data/prepared/transfer.jsonl")}
    signal = TeacherSignal(root / f"data/logits/{strategy}", responses, root / "models/teacher",
                           transfer_ids=list(questions))
    vocab = check_same_vocab(root / "models/teacher", root / "models/student", trust_remote_code)
    tok = load_tokenizer(root / "models/student", trust_remote_code)
    return KdInputs(responses, questions, signal, vocab, tok)
