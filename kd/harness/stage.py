"""The frame every stage script shares, in the order it must happen (stages/*.py call it; DVC runs them).

    st = Stage("teacher", strategy, allowed=lambda c: c.prompting.strategies, key="prompting.strategies")
    rank, procs = st.launch(st.c.compute.processes)   # compute.processes > 1: re-executes under accelerate launch
    st.seed()
    ...                                                # the stage's own work, reading st.c (typed params)
    st.finish("24 responses, ...")                     # rank 0: environment/<stage>.json, one summary line

1. params.yaml is read and validated once (kd.config.params.load_config: typed sections, every key checked);
2. the stage argument is checked against params before it reaches any path (kd.core.names.stage_arg);
3. the clock starts; `launch` relaunches under accelerate when asked, `seed` seeds every generator;
4. `finish` records the environment the outputs depend on (kd.core.environment, on rank 0 only), prints one line
   `<stage>[@<arg>]: <summary> (<seconds> s)` and leaves the process group.
compute.portable's ISA caps must be applied before torch loads, so each heavy stage still does that on its first line.
"""

from __future__ import annotations

import time
from typing import Callable

from kd.config.params import Params, load_config
from kd.core import launch
from kd.core.environment import record_environment
from kd.core.names import stage_arg
from kd.core.seeding import seed_everything


class Stage:
    """One stage's run: `name` is the stage script (stages/<name>.py), `arg` its DVC `foreach` item, if any."""

    def __init__(self, name: str, arg: str | None = None, *, kind: str = "strategy",
                 allowed: Callable[[Params], list[str]] | None = None, key: str = "prompting.strategies"):
        self.name, self.arg = name, arg
        self.c = load_config()
        if arg is not None:  # before any path use: the argument names a folder and a file
            stage_arg(kind, arg, (allowed or (lambda c: c.prompting.strategies))(self.c), key)
        self.rank, self.procs, self._launched = 0, 1, False
        self.t0 = time.time()

    @property
    def label(self) -> str:
        """How DVC names the stage: teacher@none, finetune (attention and eval stages: the script's name)."""
        return f"{self.name}@{self.arg}" if self.arg is not None else self.name

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    def launch(self, processes: int, sharding: str = "ddp") -> tuple[int, int]:
        """compute.processes > 1: re-execute this stage under `accelerate launch` (kd.core.launch); (rank, size)."""
        launch.relaunch(processes, f"stages.{self.name}", [self.arg] if self.arg is not None else [],
                        sharding=sharding)
        self.rank, self.procs = launch.init()
        self._launched = True
        return self.rank, self.procs

    def seed(self) -> None:
        seed_everything(self.c.seed)

    def finish(self, summary: str | None = None, *, environment: bool = True) -> None:
        """Rank 0: environment/<name>[-<arg>].json (the lineage beyond params + code) and the summary line."""
        if self.rank == 0:
            if environment:
                record_environment(self.name if self.arg is None else f"{self.name}-{self.arg}")
            if summary is not None:
                print(f"{self.label}: {summary} ({self.seconds:.1f} s)")
        if self._launched:
            launch.finish()
