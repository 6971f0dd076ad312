"""Two runs at once: the second is told who holds the project (or waits with --wait-lock), never
runs into the first; racing registrations end as if they had run one after the other."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from mmpipe.lock import read_owner
from tests.conftest import REPO
from tests.faults.conftest import TERMINATED, env, mmpipe, one_line, popen_mmpipe, weights


def _hold(project: Path) -> subprocess.Popen[str]:
    """A long `mmpipe train` holding the project; returns once its lock names its MLflow run."""
    holder = popen_mmpipe(project, "train", "--set", "train.epochs=500")
    deadline = time.monotonic() + 300
    while read_owner(project / ".mmpipe").get("run_id") is None:
        assert holder.poll() is None, holder.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return holder


def _stop(holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGTERM)
    holder.communicate(timeout=300)
    assert holder.returncode == TERMINATED


def test_a_second_writer_is_told_who_holds_the_project(project):
    holder = _hold(project)
    try:
        owner = read_owner(project / ".mmpipe")
        busy = mmpipe(project, "shard", "--set", "shard.jpeg_quality=70")
        flow = subprocess.run(
            [sys.executable, "-m", "flows.nightly", "--project-dir", str(project)],
            capture_output=True, text=True, env=env(), timeout=300,
        )  # fmt: skip
    finally:
        _stop(holder)
    assert owner["pid"] == holder.pid
    for proc, prog in ((busy, "mmpipe shard"), (flow, "python -m flows.nightly")):
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = one_line(proc.stderr)
        assert line.startswith(f"{prog}: error: project busy: mmpipe train (pid {holder.pid} ")
        assert f"run {owner['run_id']}) since {owner['since']}" in line
        assert "--wait-lock" in line


def test_wait_lock_runs_after_the_holder(project):
    holder = _hold(project)
    waiter = popen_mmpipe(project, "evaluate", "--wait-lock", "300")
    told = waiter.stderr.readline()  # blocks until the waiter says it waits
    assert "project busy: mmpipe train" in told and "waiting up to 300 s" in told, told
    assert waiter.poll() is None  # waiting, not running into the holder
    _stop(holder)
    _, stderr = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, stderr[-3000:]
    assert "evaluate" in stderr


def test_two_runs_at_once_one_runs_the_other_is_busy(project):
    runs = [popen_mmpipe(project, "run", "--set", f"train.seed={s}") for s in (1, 2)]
    out = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in runs]
    done = [o for o in out if o[3] == 0]
    busy = [o for o in out if o[3] != 0]
    assert len(done) == 1 and len(busy) == 1, [o[2][-2000:] for o in out]
    assert busy[0][3] == 2
    line = one_line(busy[0][2])
    assert line.startswith(f"mmpipe run: error: project busy: mmpipe run (pid {done[0][0]} ")
    # the registered version holds the weights the winner trained (not another run's)
    from mmpipe import tracking
    from mmpipe.config import TrackingParams
    from mmpipe.tracking.models import fetch_model

    result = json.loads(done[0][1])["register"]
    store = tracking.connect(TrackingParams(), project)
    checkpoint, _ = fetch_model(store, f"models:/mmpipe-fusion/{result['version']}")
    assert weights(checkpoint) == weights(project / "models" / "best.pt")


def test_racing_registrations_end_as_if_serialised(tmp_path):
    """0.9 and 0.7 race against a 0.5 champion, three rounds: the champion is 0.9 every time,
    and each contender's 'promoted' is what running after the other would give."""
    assert_races_serialised(tmp_path)


def assert_races_serialised(tmp_path: Path, uri: str | None = None) -> list[dict]:
    """The registration race on the store ``uri`` (default: a SQLite DB in ``tmp_path``);
    returns every contender's registration results."""
    from tests.faults.race_register import logged_model, register, store_params

    rounds = 3
    store = store_params(tmp_path, uri)
    argv_uri = [uri] if uri else []
    for r in range(rounds):
        assert register(*logged_model(store, tmp_path), 0.5, f"race-{r}")["promoted"]
    contenders = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.faults.race_register",
                str(tmp_path),
                acc,
                str(rounds),
                *argv_uri,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
            cwd=REPO,
        )  # fmt: skip
        for acc in ("0.9", "0.7")
    ]
    lines: list[list[str]] = [[], []]
    for r in range(rounds):
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob(f"ready-{r}-*"))) < 2:  # both logged their model
            assert all(p.poll() is None for p in contenders) and time.monotonic() < deadline
            time.sleep(0.01)
        (tmp_path / f"go-{r}").touch()
        for i, proc in enumerate(contenders):
            lines[i].append(proc.stdout.readline())
    for proc in contenders:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(store.uri, registry_uri=store.uri)
    for r in range(rounds):
        high, low = (json.loads(lines[i][r]) for i in (0, 1))
        champion = client.get_model_version_by_alias(f"race-{r}", "champion")
        assert champion.tags["accuracy"] == "0.9" and int(champion.version) == high["version"]
        assert high["promoted"]
        if low["promoted"]:  # 0.7 went first: it beat 0.5, then 0.9 beat it
            assert (low["previous_champion_value"], high["previous_champion_value"]) == (0.5, 0.7)
        else:  # 0.9 went first: 0.7 was compared with it
            assert (high["previous_champion_value"], low["previous_champion_value"]) == (0.5, 0.9)
    return [json.loads(line) for contender in lines for line in contender]
