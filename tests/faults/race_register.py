"""One contender of the registration race (tests/faults/test_concurrency.py).

    python -m tests.faults.race_register STORE_DIR ACCURACY ROUNDS [STORE_URI]

For each round r: log a model, say so (STORE_DIR/ready-r-ACCURACY), wait for STORE_DIR/go-r, then register it as a version of
``race-r`` with ``accuracy=ACCURACY`` and print the result as one JSON line. Logging before the
start line makes the contenders reach ``register_and_maybe_promote`` together.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlflow

from mmpipe import tracking
from mmpipe.config import RegisterParams, TrackingParams


class Constant(mlflow.pyfunc.PythonModel):
    """A model with no weights: the race is about the alias, not the model."""

    def predict(self, context, model_input, params=None):
        return model_input


def store_params(store_dir: Path, uri: str | None = None) -> TrackingParams:
    """The shared store of the race: ``uri`` (PostgreSQL) or a SQLite DB in ``store_dir``."""
    return TrackingParams(uri=uri or f"sqlite:///{store_dir / 'mlflow.db'}")


def logged_model(store: TrackingParams, root: Path) -> tuple[tracking.Run, str]:
    """A finished run with a logged model, and the model's URI."""
    with tracking.start_run(store, root, run_name="train") as run:
        pass
    with mlflow.start_run(run_id=run.id):
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=[])
    return run, info.model_uri


def register(run: tracking.Run, uri: str, accuracy: float, name: str) -> dict:
    """Register ``uri`` as a version of ``name``; the alias moves only on improvement."""
    p = RegisterParams(model_name=name)
    return tracking.register_and_maybe_promote(run, uri, {"accuracy": accuracy}, p, data_hash="d")


def main(store_dir: str, accuracy: str, rounds: str, uri: str | None = None) -> None:
    root = Path(store_dir)
    store = store_params(root, uri)
    for r in range(int(rounds)):
        run, model_uri = logged_model(store, root)
        (root / f"ready-{r}-{accuracy}").touch()
        while not (root / f"go-{r}").exists():
            time.sleep(0.002)
        print(json.dumps(register(run, model_uri, float(accuracy), f"race-{r}")), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
