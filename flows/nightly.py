"""The nightly retraining flow: ingest → curate → align → shard → train → evaluate → register.

    python -m flows.nightly [--params params.yaml] [--set section.key=value ...] [--project-dir .]
                            [--resume] [--wait-lock SECONDS]

Data stages are skipped when their inputs and params are unchanged (content-keyed cache, see
tasks/stages.py); train, evaluate and register always run. One MLflow parent run per flow run,
with a nested run per stage; the parent run gets the night's headline metrics (``test.*``,
``promoted``) and the morning report (``reports/report.html``). The outputs are then recorded
with DVC (``dvc.lock``, tasks/versioning.py), so `dvc status` is clean and `dvc repro` a no-op
after the flow. If a stage fails, later stages do not run (so nothing is promoted), and the flow
logs a summary table of every stage before it fails. align's splits are checked right after align
(``pipeline.check_splits``). A user error (bad input or params) ends the flow run Failed with the
one line ``mmpipe <stage>`` prints for it, and no traceback: the CLI prints it and exits 2.

The flow holds the project lock for its whole run (a second run fails "project busy", or waits
with ``--wait-lock``). SIGTERM stops it: during training the model is checkpointed first; the
stages after the interrupted one do not run, the MLflow runs end KILLED, nothing is recorded
with DVC, and the command exits 143 (docs/failure-semantics.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed

from mmpipe import lock, signals
from mmpipe.commit import as_disk_full
from mmpipe.config import Params, ParamsError, add_params_arguments, load_params, params_from_args
from mmpipe.config import params_file as params_path  # `params_file` is the flow parameter
from mmpipe.errors import MmpipeError
from mmpipe.layout import Layout, sqlite_path, store_uri
from mmpipe.objectives import metric_of
from mmpipe.pipeline import DATA_STAGES, ORDER, check_splits, close_flow_run, project_lock
from tasks.stages import (
    data_stage,
    finish_tracking_task,
    model_task,
    publish_task,
    start_tracking_task,
    train_task,
)
from tasks.versioning import record_outputs_task


class StageFailed(RuntimeError):
    """A stage of the nightly flow failed; the message is the flow's summary table."""


class UserError(StageFailed):
    """A stage (or the check after align) failed on the user's input or params: ``line`` is the
    one line ``mmpipe <stage>`` prints for it; the message adds the summary table."""

    def __init__(self, line: str, table: str) -> None:
        super().__init__(f"{line}\n{table}")
        self.line = line


def summary_table(rows: list[dict[str, str]]) -> str:
    """One line per stage: its status, its time and the figures that matter."""
    lines = [f"{'stage':<10} {'status':<11} {'time':>7}  detail"]
    lines += [
        f"{r['stage']:<10} {r['status']:<11} {r.get('time', ''):>7}  {r['detail']}" for r in rows
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def record_detail(recorded: dict[str, Any]) -> str:
    """The summary line of the DVC record: which stages dvc.lock now vouches for, which not."""
    done, skipped = recorded["recorded"], recorded["skipped"]
    text = f"dvc.lock records {', '.join(done)}" if done else "nothing recorded in dvc.lock"
    for reason in sorted(set(skipped.values())):
        text += f"; not {', '.join(s for s, r in skipped.items() if r == reason)}: {reason}"
    return text


def after_row(name: str, state: Any, describe: Callable[[Any], str]) -> dict[str, str]:
    """The summary line of a step after the stages; its failure is reported, not raised: the
    model is trained, evaluated and registered by then."""
    if state.is_failed() or state.is_crashed():
        exc = state.result(raise_on_failure=False)
        return {"stage": name, "status": "FAILED", "detail": f"{type(exc).__name__}: {exc}"}
    return {"stage": name, "status": "done", "detail": describe(state.result())}


def _counts(kind: dict[str, Any]) -> str:
    return f"{kind['accepted']}/{kind['seen']} accepted"


def detail(stage: str, result: dict[str, Any]) -> str:
    """The summary line of a stage's report: counts, the best validation metric, test scores."""
    if stage == "ingest":
        return f"images {_counts(result['images'])}, captions {_counts(result['captions'])}"
    if stage == "curate":
        near = result.get("near_duplicates") or {}
        groups = f", near-duplicate groups {near['groups']}" if near else ""
        return f"images {_curated(result['images'])}, pairs {_curated(result['pairs'])}{groups}"
    if stage == "train":
        best = result.get("selection_metric", "val_accuracy")
        parts = {"epochs": result["epochs_completed"], f"best {best}": result["best_metric"]}
    else:
        keys = {
            "align": ("pairs", "orphan_images", "orphan_captions"),
            "shard": ("samples", "shards", "new_samples", "reused_shards"),
            "evaluate": (_headline(result), "i2t_r1", "t2i_r1"),
            "register": ("version", "promoted", "champion_version"),
        }.get(stage)
        if keys is None:  # a stage without its own line: its top-level numbers and flags
            keys = tuple(k for k, v in result.items() if isinstance(v, int | float | bool))
        parts = {k: result[k] for k in keys if k in result}
    return ", ".join(f"{k}={_fmt(v)}" for k, v in parts.items())


def _curated(counts: dict[str, Any]) -> str:
    return f"{counts['kept']}/{counts['in']} kept"


def _headline(metrics: dict[str, Any]) -> str:
    """The task's register metric in evaluate's metrics (mean_r1 without labels)."""
    return metric_of(None, None, metrics)[0]


@flow(name="mmpipe-nightly")
def nightly(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    project_dir: str = ".",
    resume: bool = False,
    params: Params | None = None,
    wait_lock: float = 0.0,
) -> dict[str, Any]:
    """Run the whole DAG once; returns where to look (UI command, report, champion version).

    ``params``: params already validated by the caller (the CLI); otherwise they are read from
    ``params_file`` (relative to ``project_dir``) + ``overrides``, as scheduled runs do.
    ``wait_lock``: seconds to wait for a project another run holds (0: fail at once).
    """
    layout = Layout(Path(project_dir).resolve())
    if params is None:
        params = load_params(params_path(params_file, layout.root), overrides)
    with project_lock(layout, "nightly flow", wait=wait_lock):
        parent = start_tracking_task(params, layout)
        lock.annotate(layout.state_dir, run_id=parent)
        try:
            rows, results, timings, stopped = run_stages(params, layout, parent, resume)
            if stopped is None:
                report = publish_task(
                    params, layout, parent, results, timings, params_file, list(overrides or []),
                    return_state=True,
                )  # fmt: skip
                rows.append(after_row("report", report, lambda r: f"{r['html']}"))
            if not isinstance(stopped, signals.Interrupted):
                recorded = record_outputs_task(params, layout, list(results), return_state=True)
                rows.append(after_row("dvc", recorded, record_detail))
        except BaseException:  # Prefect's SIGTERM bridge, Ctrl-C: the parent run must not hang
            with contextlib.suppress(Exception):  # outside Prefect's machinery, which is unwinding
                close_flow_run(params, layout, parent, "KILLED", "interrupted")
            raise
        table = summary_table(rows)
        status = "KILLED" if isinstance(stopped, signals.Interrupted) else "FAILED"
        finish_tracking_task(params, layout, parent, status if stopped else "FINISHED", table)
    get_run_logger().info("nightly summary\n%s", table)
    if isinstance(stopped, signals.Interrupted):
        raise signals.Interrupted(f"nightly flow {stopped}; nothing was promoted\n{table}",
                                  stopped.signum)  # fmt: skip
    if isinstance(stopped, MmpipeError):  # the user's to fix: one line, no traceback
        stage = next(r["stage"] for r in rows if r["status"] == "FAILED")
        prog = "python -m flows.nightly" if stage == "check" else f"mmpipe {stage}"
        line = f"{prog}: error: {stopped}"
        why = f"nightly flow stopped at {stage} (see the summary); nothing was promoted"
        return Failed(message=why, data=UserError(line, table))
    if stopped is not None:
        raise StageFailed(f"nightly flow failed; nothing was promoted\n{table}")
    return {
        "parent_run_id": parent,
        "summary": rows,
        "ui": f"mmpipe ui --project-dir {layout.root}",
        "report": str(layout.eval_dir / "report.html"),
        **{k: results["register"].get(k) for k in ("version", "champion_version", "promoted")},
    }


def run_stages(
    params: Params, layout: Layout, parent: str, resume: bool
) -> tuple[list[dict[str, str]], dict[str, Any], dict[str, float], BaseException | None]:
    """Every stage in order until one fails or is interrupted: (summary rows, results, seconds
    per stage, what stopped the run or None)."""
    logger = get_run_logger()
    rows: list[dict[str, str]] = []
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}  # seconds per stage: for the log, MLflow and the report only
    stopped: BaseException | None = None
    for name in ORDER:
        started = time.perf_counter()
        signum = signals.requested()
        if stopped is None and signum is not None:  # a signal came between two stages
            why = f"stopped by {signals.signal_name(signum)} before {name}"
            stopped = signals.Interrupted(why, signum)
        if stopped is not None:
            rows.append({"stage": name, "status": "not run", "detail": "an earlier stage stopped"})
            continue
        if name in DATA_STAGES:  # reuse the cached result only while outputs are current
            task = data_stage(name, params, layout)
            state = task(name, params, layout, parent_run_id=parent, return_state=True)
        elif name == "train":
            state = train_task(
                params, layout, parent_run_id=parent, resume=resume, return_state=True
            )
        else:
            state = model_task(name, params, layout, parent_run_id=parent, return_state=True)
        if state.is_failed() or state.is_crashed():
            stopped = state.result(raise_on_failure=False)
            interrupted = isinstance(stopped, signals.Interrupted)
            text = str(stopped) if interrupted else f"{type(stopped).__name__}: {stopped}"
            status = "INTERRUPTED" if interrupted else "FAILED"
            rows.append({"stage": name, "status": status, "detail": text})
            continue
        results[name] = state.result()
        timings[name] = round(time.perf_counter() - started, 1)
        status = "skipped" if state.name == "Cached" else "done"
        if status == "skipped":
            logger.info("%s: inputs and params unchanged, skipped (cached)", name)
        rows.append(
            {"stage": name, "status": status, "time": f"{timings[name]:.1f}s",
             "detail": detail(name, results[name])}
        )  # fmt: skip
        if name == "align":  # before shard and training spend their time on unusable splits
            try:
                check_splits(params, layout)
            except MmpipeError as exc:
                stopped = exc
                rows.append({"stage": "check", "status": "FAILED", "detail": str(exc)})
    return rows, results, timings, stopped


def main(argv: list[str] | None = None) -> int:
    """CLI of `python -m flows.nightly` (what `make run` calls)."""
    ap = argparse.ArgumentParser(prog="python -m flows.nightly", description=__doc__.split("\n")[0])
    add_params_arguments(ap, writes=True)
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted training in models.partial/ (same params and data only)",
    )
    args = ap.parse_args(argv)
    signals.install()  # SIGTERM outside training: exit 143 with one line (Prefect's bridge re-raises it here)
    prog = "python -m flows.nightly"
    try:  # a bad params file or --set fails here, in one line, before any flow run starts
        params = params_from_args(args)
        layout = Layout(Path(args.project_dir).resolve())
        # taken before Prefect starts: a busy project fails (or waits) in a second, not after
        # the server's start-up; the flow takes it again (re-entrant) for scheduled runs
        with project_lock(layout, "nightly flow", wait=args.wait_lock):
            out = nightly(args.params, args.overrides, args.project_dir, args.resume, params)
    except ParamsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except signals.Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:  # the flow logged the summary table
        print(exc.line, file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except MmpipeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        full = as_disk_full(exc, sqlite_path(store_uri(params.tracking.uri, args.project_dir)))
        if full is None:
            raise
        print(f"{prog}: error: {full}", file=sys.stderr)
        return 2
    champion = out.get("champion_version")
    print(
        "\nmmpipe nightly: done\n"
        f"  MLflow UI:  make ui   (= .venv/bin/{out['ui']}; open the runs page it prints)\n"
        f"  report:     {out['report']} (metrics.json and plots/ beside it)\n"
        f"  model:      version {out.get('version')} registered; champion is version {champion}"
        f" ({'promoted' if out.get('promoted') else 'not promoted'})"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
