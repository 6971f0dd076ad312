"""`mmpipe` (and `python -m mmpipe`): run a stage, all of them, or use the trained model.

    mmpipe <stage> [--params FILE] [--set section.key=value ...] [--project-dir DIR]

`mmpipe <stage> --help` lists every field of the stage's params sections with its default,
meaning and allowed values. Errors a user can cause (a full disk and a busy project included)
print one clear line and exit 2, never a traceback; SIGTERM exits 143 and Ctrl-C 130, with one
line saying what was kept (docs/failure-semantics.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from mmpipe import signals
from mmpipe.commit import as_disk_full
from mmpipe.config import (
    Params,
    ParamsError,
    add_params_arguments,
    describe_section,
    params_from_args,
)
from mmpipe.errors import MmpipeError
from mmpipe.io import json_safe
from mmpipe.layout import STAGES, Layout

log = logging.getLogger("mmpipe")

DESCRIPTION = """\
mmpipe: a batch data-and-training pipeline for image + text collections.

It validates a collection (ingest), pairs images with captions and splits them (align), writes
WebDataset shards (shard), trains a CLIP-style dual encoder with a fusion classifier (train),
measures retrieval and classification (evaluate) and registers the model in MLflow, promoting it
only when it beats the champion (register). `dvc repro` runs these same commands; the nightly
flow (`python -m flows.nightly`) runs them under Prefect.
"""

EPILOG = """\
examples:
  mmpipe run                                  every stage, in order, on params.yaml
  mmpipe train --set train.fusion=gated       one stage with one param changed
  mmpipe train --help                         every train param: default, meaning, choices
  mmpipe predict img.jpg "a red circle"       classify a pair with the champion model
  mmpipe ui                                   browse runs and models in the MLflow UI
  git checkout <rev> && mmpipe restore        a past night: data, model and report
"""

RUN_HELP = "all stages in order, without Prefect (the nightly flow is `python -m flows.nightly`)"
RESUME_HELP = (
    "continue the interrupted training in models.partial/ (refused if it was made with other "
    "train params or data)"
)


def _sections(command: str) -> tuple[str, ...]:
    """The params sections a command reads (for its --help)."""
    if command == "run":
        return tuple(Params.model_fields)
    spec = STAGES[command]
    return spec.params + (("tracking",) if spec.tracked else ())


def _fields_epilog(sections: tuple[str, ...]) -> str:
    lines = ["params (set in params.yaml or with --set KEY=VALUE):"]
    for section in sections:
        model = Params.model_fields[section].annotation
        for key, default, desc in describe_section(model, f"{section}."):
            lines.append(f"  {key} = {default}")
            lines.append(textwrap.fill(desc, 96, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mmpipe",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {name: spec.help for name, spec in STAGES.items()} | {"run": RUN_HELP}
    for name, help_text in helps.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_fields_epilog(_sections(name)),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_params_arguments(p, writes=True)
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if name in ("train", "run"):
            p.add_argument("--resume", action="store_true", help=RESUME_HELP)
        if name == "run":
            p.add_argument(
                "--until",
                choices=list(STAGES),
                default=None,
                metavar="STAGE",
                help="stop after this stage (e.g. shard: the data stages in one process, "
                "paying the imports once instead of once per stage)",
            )
    p = sub.add_parser("params", help="print the validated params (after --set) as JSON")
    add_params_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_predict_parsers(sub)
    p = sub.add_parser(
        "ui",
        help="start the MLflow UI on the project's tracking store (127.0.0.1), print its URL",
        description="Serve the MLflow UI on the store that tracking.uri names (a tracking "
        "server's own UI is used as is) and print the runs page: one row per night.",
    )
    add_params_arguments(p)
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    p = sub.add_parser(
        "restore",
        help="check out the outputs dvc.lock names; refuses (changing nothing) when one is in "
        "no cache, where `dvc checkout` would delete it",
        description="The DVC half of a restore (docs/restore.md): after `git checkout <rev>` "
        "(or `git checkout -- params.yaml dvc.lock reports/`), bring back every output of that "
        "dvc.lock, then rewrite the report and run.json from the restored outputs.",
    )
    p.add_argument(
        "--project-dir", default=".", help="project directory holding dvc.yaml and dvc.lock"
    )
    # `mmpipe schedule ...` never reaches argparse (see main); listed for `mmpipe --help`
    sub.add_parser("schedule", help="serve the nightly flow on a cron schedule (see its --help)")
    return parser


def _add_predict_parsers(sub: Any) -> None:
    model_help = (
        "model URI, checkpoint or models dir (default: the registry's champion "
        "(register.model_name@register.alias), else models/best.pt), or hf:<hub id or dir> of "
        "a CLIP/SigLIP as it ships (zero-shot)"
    )
    p = sub.add_parser("predict", help="classify an (image, caption) pair")
    p.add_argument("image")
    p.add_argument("caption")
    p.add_argument("--audio", default=None, help="the pair's audio clip (a tri-modal model)")
    p.add_argument("--model", default=None, help=model_help)
    add_params_arguments(p)
    p = sub.add_parser("search", help="top-k captions for an image, or images for a caption")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--image", help="query image; candidates are --captions")
    group.add_argument("--caption", help="query caption; candidates are --images")
    p.add_argument("--captions", nargs="*", default=[], help="candidate captions")
    p.add_argument("--images", nargs="*", default=[], help="candidate image files")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--model", default=None, help=model_help)
    add_params_arguments(p)
    p = sub.add_parser(
        "eval-retrieval",
        help="R@1/5/10 both ways of a model on a whole image-caption collection (JSON)",
        description="Embed every image and caption of a collection and rank all against all, "
        "the protocol of the Flickr/COCO retrieval tables and clip_benchmark: each caption "
        "queries every image, each image every caption (a hit for any of its own). Prints "
        "R@K, median ranks, counts and chance levels as JSON; rejected records are counted.",
    )
    p.add_argument("root", help="the collection's folder (images + captions file)")
    p.add_argument("--captions", required=True,
                   help="captions file under ROOT: .csv/.jsonl/.parquet (image, caption), or "
                   "COCO captions .json with --source coco")  # fmt: skip
    p.add_argument("--source", choices=("folder", "coco"), default="folder")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--allow-download", action="store_true",
                   help="let an hf: model download when not in the local cache")  # fmt: skip
    add_params_arguments(p)
    p = sub.add_parser("caption", help="a caption for an image (a train.task=captioning model)")
    p.add_argument("image")
    p.add_argument("--beam", type=int, default=None,
                   help="beams of the beam search, 1 = greedy (default: evaluate.beam_size)")  # fmt: skip
    p.add_argument("--model", default=None, help=model_help)
    add_params_arguments(p)


def _run_eval_retrieval(args: argparse.Namespace) -> Any:
    from mmpipe.io import write_json_atomic
    from mmpipe.retrieval import eval_retrieval

    predictor = _load_predictor(args)[0]
    result = eval_retrieval(
        Path(args.root), args.captions, predictor, source=args.source, batch_size=args.batch_size
    )
    result["model"] = args.model or predictor.source
    if args.json:
        write_json_atomic(Path(args.json), result)
    return result


def _load_predictor(args: argparse.Namespace) -> tuple[Any, Any, Any, Path]:
    """The predictor of ``--model`` (else the champion, else models/), its params, its sidecar
    and its checkpoint."""
    from mmpipe import tracking
    from mmpipe.predict import load_predictor

    params = params_from_args(args, file_optional=True)
    if args.model and args.model.startswith("hf:"):  # a pretrained dual encoder as it ships
        from mmpipe.predict import hf_predictor

        allow = params.train.allow_download or getattr(args, "allow_download", False)
        return hf_predictor(args.model, allow_download=allow), params, {}, Path(args.model)
    layout = Layout(Path(args.project_dir))
    checkpoint, sidecar = tracking.resolve_model(
        args.model, params.tracking, params.register, layout
    )
    predictor = load_predictor(checkpoint, sidecar=sidecar, shard_dir=layout.shard_dir)
    return predictor, params, sidecar, checkpoint


def _run_predict(args: argparse.Namespace) -> Any:
    from mmpipe import tracking

    predictor, params, sidecar, checkpoint = _load_predictor(args)
    predictor.audio_limits = params.ingest.audio
    if args.command == "predict":
        images, captions = [args.image], [args.caption]
    elif args.command == "caption":
        images, captions = [args.image], []
    else:
        images = [args.image] if args.image else list(args.images)
        captions = list(args.captions) if args.image else [args.caption]
    label = args.model or (tracking.champion_uri(params.register) if sidecar else str(checkpoint))
    warnings = _tell_what_it_knows(predictor, label, images, captions)
    if args.command == "predict":
        clip = {"audio": args.audio} if args.audio else {}
        return {**predictor.classify_pair(args.image, args.caption, **clip), "warnings": warnings}
    if args.command == "caption":
        beam = args.beam or params.evaluate.beam_size
        caption = predictor.caption_images([args.image], beam=beam)[0]
        return {"image": args.image, "caption": caption, "beam": beam, "warnings": warnings}
    if args.image:
        return predictor.search_captions(args.image, args.captions, k=args.k)
    return predictor.search_images(args.caption, args.images, k=args.k)


def _tell_what_it_knows(
    predictor: Any, label: str, images: list[str], captions: list[str]
) -> list[str]:
    """Print (stderr) what the model was trained on, and a warning per input unlike that data."""
    print(f"model: {label}\ntrained on: {predictor.trained_on()}", file=sys.stderr)
    if predictor.profile is None:
        print("(no training profile with this model: inputs are not checked)", file=sys.stderr)
        return []
    warnings = predictor.input_warnings(images, captions)
    for text in warnings:
        print(f"warning: {text}", file=sys.stderr)
    return warnings


def _dispatch(args: argparse.Namespace) -> Any:
    """The result of one parsed command (printed as JSON by ``main``)."""
    if args.command in STAGES or args.command == "run":
        from mmpipe import pipeline

        params, layout = params_from_args(args), Layout(Path(args.project_dir))
        resume = getattr(args, "resume", False)
        with pipeline.project_lock(layout, f"mmpipe {args.command}", wait=args.wait_lock):
            if args.command == "run":
                return pipeline.run_all(params, layout, resume=resume, until=args.until)
            return pipeline.run_stage(args.command, params, layout, resume=resume)
    if args.command == "params":
        return params_from_args(args).model_dump(mode="json")
    if args.command == "restore":
        from mmpipe import pipeline
        from mmpipe.restore import restore

        layout = Layout(Path(args.project_dir))
        with pipeline.project_lock(layout, "mmpipe restore"):  # never under a running night
            return restore(layout.root)
    if args.command == "eval-retrieval":
        return _run_eval_retrieval(args)
    return _run_predict(args)


def _store_path(args: argparse.Namespace) -> Path | None:
    """The SQLite file of the project's tracking store (what a full disk may have hit)."""
    from mmpipe.layout import sqlite_path, store_uri

    try:
        params = params_from_args(args, file_optional=True)
    except ParamsError:
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or store_uri(params.tracking.uri, args.project_dir)
    return sqlite_path(uri)


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
    if args.command in STAGES or args.command == "run":
        signals.install()  # SIGTERM: a one-line message and exit 143, never a half output
    try:
        if args.command == "ui":
            from mmpipe.ui import create_ui_target, serve_ui

            serve_ui(create_ui_target(params_from_args(args), args.project_dir), port=args.port)
            return 0
        result = _dispatch(args)
    except signals.Interrupted as exc:
        print(f"mmpipe {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ParamsError, MmpipeError) as exc:
        print(f"mmpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        full = as_disk_full(exc, _store_path(args))  # ENOSPC / SQLite full, at the boundary
        if full is None:
            raise
        print(f"mmpipe {args.command}: error: {full}", file=sys.stderr)
        return 2
    print(json.dumps(json_safe(result), indent=2, sort_keys=True, default=str, allow_nan=False))
    return 0
