"""kd.models.chat_template: a model folder's chat template is rendered once, bounded, in a child process before
kd-prime renders it for real; a hostile one is refused in one line naming the model, at the model stage and before
any stage's first prompt."""

from __future__ import annotations

import json
import shutil

import pytest

from kd.core.errors import ArtefactError
from kd.models import chat_template as ct

PLAIN = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("template, why", [
    ("{{ 'x' * 3000000000 }}", "needs more than 1024 MB of memory"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "is refused by Jinja's sandbox (SecurityError"),
    ("{% for %}", "fails to render (TemplateSyntaxError"),
    ("{{ 'x' * 2000000 }}", "renders a 2,000,000-character prompt"),
    ("{{ raise_exception('no system role') }}", "fails to render (TemplateError: no system role)"),
])
def test_hostile_templates_are_refused_in_one_line(template, why):
    with pytest.raises(ArtefactError) as e:
        ct.check_chat_template(template, "models/student")
    msg = str(e.value)
    assert msg.startswith("models/student: its chat template") and why in msg and "\n" not in msg, msg


def test_a_template_that_never_ends_is_stopped_at_the_bound(monkeypatch):
    monkeypatch.setattr(ct, "CHECK_SECONDS", 6)
    # The body prints nothing, so the render's memory stays flat: a body that prints (even '') grows Jinja's output
    # list by one item per turn, and a fast machine then hits CHECK_MEMORY before the time bound (a CI run did).
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% set k = j %}{% endfor %}{% endfor %}"
    with pytest.raises(ArtefactError, match="did not finish rendering one prompt in 6 s"):
        ct.check_chat_template(loops, "models/teacher")


def test_a_plain_template_passes_once_per_process(monkeypatch):
    ct.check_chat_template(PLAIN, "m")
    monkeypatch.setattr(ct.subprocess, "run", lambda *a, **k: pytest.fail("checked twice"))
    ct.check_chat_template(PLAIN, "m")  # remembered by its sha256


def test_the_model_stage_and_every_prompt_check_the_folder_template(tiny_models, tmp_path):
    """describe_folder (the model stage's check of what it wrote) and chat_ids (every stage's prompts) refuse a
    folder whose template was made hostile; the tiny models' own template passes."""
    from kd.data.prompting import chat_ids
    from kd.models.convert import describe_folder
    from kd.models.loading import load_tokenizer

    assert chat_ids(load_tokenizer(tiny_models / "student"), "What is 2 + 3?")
    bad = tmp_path / "student"
    shutil.copytree(tiny_models / "student", bad)
    cfg_path = bad / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{{ 'x' * 3000000000 }}"
    cfg_path.write_text(json.dumps(cfg))
    (bad / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ArtefactError, match=f"{bad}: its chat template .* needs more than"):
        describe_folder(bad)
    with pytest.raises(ArtefactError, match="its chat template .* needs more than"):
        chat_ids(load_tokenizer(bad), "What is 2 + 3?")
