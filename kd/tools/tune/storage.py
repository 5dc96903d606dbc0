"""`kd tune`'s study and its database: Optuna's RDB storage (any SQLAlchemy URL; SQLite under the project by
default) with heartbeats, so a killed trial is failed and re-queued by the next `kd tune` on the study."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from kd.core.errors import KdError

if TYPE_CHECKING:
    from kd.config.params import Params


def study_name(c: Params) -> str:
    t = c.tune
    return t.study or f"{c.profile or 'custom'}-{t.strategy}-{t.objective}"


def open_storage(url: str, heartbeat: int, root: Path = Path(".")):
    """Optuna's RDB storage with heartbeats and retry of stale (killed) trials. A relative SQLite path is relative
    to the project root; its folder is created."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise KdError(f"tune.storage: {url!r} is not an SQLAlchemy URL ({e}); e.g. sqlite:///tune/optuna.db or "
                      "postgresql+psycopg2://user@host/db") from None
    engine_kwargs = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            db = Path(parsed.database)
            if not db.is_absolute():  # relative: inside the project, after symlinks (kd/core/guard.py); absolute: as named
                from kd.core.guard import guard

                try:
                    guard(db, root, "create a database in")
                except KdError as e:
                    raise KdError(f"tune.storage: {url!r}: {e}") from None
                db = Path(root) / db
            db.parent.mkdir(parents=True, exist_ok=True)
            url = parsed.set(database=str(db)).render_as_string(hide_password=False)
        # several processes write one file: wait for the lock instead of failing after SQLite's default 5 s
        engine_kwargs = {"connect_args": {"timeout": 300}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        from sqlalchemy.exc import IntegrityError, OperationalError

        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
            except ImportError as e:
                raise KdError(f"tune.storage: the database driver for {parsed.drivername!r} is not installed "
                              f"({e})") from None
            except (IntegrityError, OperationalError):
                # two processes creating a new database's schema at once: the loser finds it made next time
                if attempt == 4:
                    raise
                time.sleep(1 + attempt)


def redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def load_study(c: Params, root: Path = Path(".")):
    """Create or join the study (the TPE sampler is seeded per trial: see `seed_sampler`)."""
    import optuna

    t = c.tune
    storage = open_storage(t.storage, t.heartbeat, root)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=t.pruner.startup_trials,
                                         n_warmup_steps=t.pruner.warmup_steps)
    name = study_name(c)
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True,
                                pruner=pruner)
    study.sampler = optuna.samplers.TPESampler(seed=c.seed)
    study.set_user_attr("objective", t.objective)
    return study


def finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
