"""`python -m mmpipe <stage>`: the one command shape every stage shares (what dvc.yaml runs).

    mmpipe <stage> [--params FILE] [--set section.key=value ...] [--project-dir DIR]

`mmpipe <stage> --help` lists every field of the stage's params section with its default and
meaning. Errors a user can cause print one clear line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmpipe.config import Params, ParamsError, describe_section, load_params, params_file
from mmpipe.errors import MmpipeError
from mmpipe.layout import Layout

log = logging.getLogger("mmpipe")

# stage name -> (params sections it reads, one-line help)
STAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "ingest": (("ingest",), "read a source, validate every record, write records + rejects"),
    "align": (("align",), "pair images and captions, count orphans, split by image group"),
    "shard": (("shard",), "augment + write WebDataset shards and manifest.json"),
    "train": (("train", "tracking"), "train the dual encoder + fusion classifier"),
    "evaluate": (("evaluate", "train", "tracking"), "retrieval, classification, ablation"),
    "register": (("register", "tracking"), "register the model; promote if it beats the champion"),
    "run": (
        ("ingest", "align", "shard", "train", "evaluate", "register", "tracking"),
        "all stages in order, without Prefect (the nightly flow is `python -m flows.nightly`)",
    ),
}


def _fields_epilog(sections: tuple[str, ...]) -> str:
    lines = ["params (set in params.yaml or with --set KEY=VALUE):"]
    for section in sections:
        model = Params.model_fields[section].annotation
        for key, default, desc in describe_section(model, f"{section}."):
            lines.append(f"  {key} = {default}\n      {desc}")
    return "\n".join(lines)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file, relative to --project-dir (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one param (repeatable); the value is parsed as YAML",
    )
    parser.add_argument(
        "--project-dir", default=".", help="project directory holding data/, models/, reports/"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="mmpipe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (sections, help_text) in STAGES.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_fields_epilog(sections),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common(p)
        if name in ("train", "run"):
            p.add_argument("--resume", action="store_true", help="continue from models/last.pt")
    p = sub.add_parser("params", help="print the validated params (after --set) as JSON")
    _add_common(p)
    _add_predict_parsers(sub)
    p = sub.add_parser(
        "ui",
        help="start the MLflow UI on the project's tracking store (127.0.0.1), print its URL",
        description="Serve the MLflow UI on the store that tracking.uri names (a tracking "
        "server's own UI is used as is) and print the runs page: one row per night.",
    )
    _add_common(p)
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    # `mmpipe schedule ...` never reaches argparse (see main); listed for `mmpipe --help`
    sub.add_parser("schedule", help="serve the nightly flow on a cron schedule (see its --help)")
    return parser


def _add_predict_parsers(sub: Any) -> None:
    model_help = "model URI or checkpoint (default: models:/mmpipe-fusion@champion, else models/best.pt)"
    p = sub.add_parser("predict", help="classify an (image, caption) pair")
    p.add_argument("image")
    p.add_argument("caption")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--project-dir", default=".")
    p = sub.add_parser("search", help="top-k captions for an image, or images for a caption")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--image", help="query image; candidates are --captions")
    group.add_argument("--caption", help="query caption; candidates are --images")
    p.add_argument("--captions", nargs="*", default=[], help="candidate captions")
    p.add_argument("--images", nargs="*", default=[], help="candidate image files")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--project-dir", default=".")


def _run_stage(args: argparse.Namespace) -> dict[str, Any]:
    from mmpipe import pipeline

    params = load_params(params_file(args.params, args.project_dir), args.overrides)
    layout = Layout(Path(args.project_dir))
    runners: dict[str, Callable[..., dict[str, Any]]] = {
        "ingest": pipeline.stage_ingest,
        "align": pipeline.stage_align,
        "shard": pipeline.stage_shard,
        "train": pipeline.stage_train,
        "evaluate": pipeline.stage_evaluate,
        "register": pipeline.stage_register,
        "run": pipeline.run_all,
    }
    kwargs = {"resume": args.resume} if args.command in ("train", "run") else {}
    return runners[args.command](params, layout, **kwargs)


def _run_predict(args: argparse.Namespace) -> Any:
    from mmpipe import predict

    predictor = predict.load_predictor(args.model, project_dir=Path(args.project_dir))
    if args.command == "predict":
        return predictor.classify_pair(args.image, args.caption)
    if args.image:
        return predictor.search_captions(args.image, args.captions, k=args.k)
    return predictor.search_images(args.caption, args.images, k=args.k)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mmpipe` and `python -m mmpipe`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["schedule"]:
        # every argument, --help included, belongs to flows.schedule. Prefect lives in flows/,
        # which mmpipe must not import; exec (not a child process) so that SIGTERM/SIGHUP from
        # make, systemd or the terminal reach the process that stops the Prefect server
        os.execv(sys.executable, [sys.executable, "-m", "flows.schedule", *argv[1:]])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: Any
        if args.command in STAGES:
            result = _run_stage(args)
        elif args.command == "params":
            path = params_file(args.params, args.project_dir)
            result = load_params(path, args.overrides).model_dump(mode="json")
        elif args.command in ("predict", "search"):
            result = _run_predict(args)
        else:  # ui
            from mmpipe.ui import create_ui_target, serve_ui

            params = load_params(params_file(args.params, args.project_dir), args.overrides)
            serve_ui(create_ui_target(params, args.project_dir), port=args.port)
            return 0
    except (ParamsError, MmpipeError) as exc:
        print(f"mmpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0
