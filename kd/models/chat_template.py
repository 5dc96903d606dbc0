"""A model folder's chat template is a Jinja program the folder brings: kd-prime renders it for every prompt. Before
the first render in a process (and when the model stage writes the folder), it is rendered once on a probe question
in a child process under a time and memory bound, so a template that loops for hours, allocates gigabytes, tries to
leave Jinja's sandbox or does not parse is refused in one line naming the model, instead of hanging or killing the
stage. A template that passed is remembered by its sha256 for the rest of the process."""

from __future__ import annotations

import json
import subprocess
import sys

from kd.core.errors import ArtefactError
from kd.core.io import sha256_bytes

CHECK_SECONDS = 60          # the child's whole life, imports included (a normal template renders in milliseconds)
CHECK_MEMORY = 1 << 30      # bytes the render may allocate beyond what the child's imports hold
MAX_RENDERED = 1 << 20      # characters of one rendered prompt
PROBE = [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                                     "many clips in May. How many clips did Natalia sell altogether in April and May?"}]
_CHECKED: set[str] = set()  # sha256 of templates that passed in this process

# The child: transformers' own renderer (its sandboxed Jinja environment), under RLIMIT_DATA set after the imports.
_CHILD = r"""
import json, resource, sys
from transformers.utils.chat_template_utils import render_jinja_template
template, probe, memory, max_chars = json.loads(sys.stdin.read())
with open("/proc/self/statm") as f:
    data_pages = int(f.read().split()[5])
used = data_pages * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_DATA, (used + memory, resource.getrlimit(resource.RLIMIT_DATA)[1]))
try:
    (text,), _ = render_jinja_template([probe], chat_template=template, add_generation_prompt=True)
    why = None if len(text) <= max_chars else f"renders a {len(text):,}-character prompt (at most {max_chars:,})"
except MemoryError:
    why = f"needs more than {memory >> 20} MB of memory to render one prompt"
except Exception as e:
    kind = "is refused by Jinja's sandbox" if type(e).__name__ == "SecurityError" else "fails to render"
    why = f"{kind} ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
print(json.dumps(why))
"""


def check_chat_template(template: str | None, model: str) -> None:
    """Refuse `model`'s chat template (ArtefactError, one line) unless one render of PROBE finishes within
    CHECK_SECONDS, CHECK_MEMORY and MAX_RENDERED. No template: nothing to check (the caller decides)."""
    if not template:
        return
    digest = sha256_bytes(template.encode("utf-8", "surrogatepass"))
    if digest in _CHECKED:
        return
    payload = json.dumps([template, PROBE, CHECK_MEMORY, MAX_RENDERED])
    try:
        res = subprocess.run([sys.executable, "-c", _CHILD], input=payload, capture_output=True, text=True,
                             timeout=CHECK_SECONDS)
        why = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 and res.stdout.strip() else \
            f"could not be rendered (the check exited {res.returncode}: {' '.join(res.stderr.split())[-200:]})"
    except subprocess.TimeoutExpired:
        why = f"did not finish rendering one prompt in {CHECK_SECONDS} s"
    if why:
        raise ArtefactError(f"{model}: its chat template (tokenizer_config.json / chat_template.jinja, sha256 "
                            f"{digest[:12]}) {why}; kd-prime renders it for every prompt: use a model with a plain "
                            "template, or re-run `dvc repro model@...` to restore the materialised one")
    _CHECKED.add(digest)
