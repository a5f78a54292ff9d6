"""The `mmjobs` command line.

Subcommands import their heavy dependencies (torch, transformers, mlflow) only when run, so
`mmjobs --help` and `mmjobs validate` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

from mmjobs import __version__

# Commands whose implementation arrives with a later issue: name -> (issue, what it will do).
PLANNED: dict[str, tuple[int, str]] = {
    "run": (6, "run a recipe's pipeline locally on embedded defaults"),
    "compile": (6, "compile a recipe to KFP pipeline YAML for a cluster"),
    "submit": (6, "submit a recipe to a Kubeflow Pipelines endpoint"),
    "train": (4, "run the train stage"),
    "import": (9, "copy a model or dataset from a hub or URL into the store"),
    "serve": (9, "serve a model behind an OpenAI-compatible API with a chat page"),
}

# Stage name -> module under mmjobs.stages (stage names are kebab-case, modules snake_case).
STAGES = ("prepare", "pretokenize", "train", "build-moe-connector", "merge", "infer",
          "evaluate", "report", "import", "serve")


def _planned(name: str) -> Callable[[argparse.Namespace], int]:
    issue, what = PLANNED[name]

    def run(_: argparse.Namespace) -> int:
        print(f"mmjobs {name}: not available yet — it will {what}; it arrives with issue #{issue}.",
              file=sys.stderr)
        return 2

    return run


# --------------------------------------------------------------------------- handlers


def cmd_validate(args: argparse.Namespace) -> int:
    from mmjobs.config import validate_main

    return validate_main(args.recipes, args.overrides)


def cmd_stage(args: argparse.Namespace) -> int:
    module_name = f"mmjobs.stages.{args.name.replace('-', '_')}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        built = [s for s in STAGES if importlib.util.find_spec(
            f"mmjobs.stages.{s.replace('-', '_')}") is not None]
        print(f"mmjobs stage: no stage {args.name!r} yet; available: {', '.join(built)}",
              file=sys.stderr)
        return 2
    return module.cli(args.stage_args)


def _stage_with_flags(stage: str, flags: dict[str, str]) -> Callable[[argparse.Namespace], int]:
    """A shortcut command (`mmjobs prepare --from X ...`) that forwards to `mmjobs stage`."""

    def run(args: argparse.Namespace) -> int:
        forwarded = [] if args.config is None else ["--config", args.config]
        for attr, field in flags.items():
            value = getattr(args, attr)
            if value is not None:
                forwarded += ["--set", f"{field}={value}"]
        for override in args.overrides:
            forwarded += ["--set", override]
        return cmd_stage(argparse.Namespace(name=stage, stage_args=forwarded))

    return run


def cmd_store_ls(args: argparse.Namespace) -> int:
    from mmjobs import storage

    total = count = 0
    for obj in storage.list_objects(args.uri):
        print(f"{obj.size:>12}  {obj.relpath}")
        total += obj.size
        count += 1
    state = "committed" if storage.is_committed(args.uri) else "no _MANIFEST.json (not committed)"
    print(f"{count} objects, {total} bytes — {state}")
    return 0 if count else 1


def cmd_store_cp(args: argparse.Namespace) -> int:
    from mmjobs import storage

    if args.uncommitted:
        print(storage.copy_uncommitted(args.src, args.dst, workers=args.workers))
    else:
        print(storage.copy(args.src, args.dst, workers=args.workers))
    return 0


def cmd_tracking_flush(args: argparse.Namespace) -> int:
    from mmjobs import settings
    from mmjobs.tracking import flush_spool

    print(flush_spool(args.path or settings.spool_dir(), args.tracking_uri))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mmjobs.doctor import run_doctor

    return run_doctor()


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from mmjobs import settings

    uri = settings.tracking_uri()
    if not uri.startswith("sqlite:"):
        print(f"MLflow is a server here: open {uri}", file=sys.stderr)
        return 0
    settings.home().mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI on http://{args.host}:{args.port} (database {uri}); Ctrl-C stops it")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port)]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`mmjobs report`: the report stage on the command line; exit 1 if nothing to report on."""
    import json

    from mmjobs.config import ConfigError, load_config
    from mmjobs.report import ReportError
    from mmjobs.stages.report import ReportConfig
    from mmjobs.stages.report import main as report_main

    flags = {"experiment": args.experiment, "parent_run_id": args.run_id, "output": args.output,
             "title": args.title, "sweep_params": args.sweep_params,
             "headline_metrics": args.headline_metrics, "force": args.force or None}
    # JSON is YAML, so names like "2024" stay strings and lists stay lists.
    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    try:
        cfg = load_config(ReportConfig, args.config or {}, [*overrides, *args.overrides],
                          source=args.config or "report options")
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        result = report_main(cfg)
    except ReportError as e:
        print(f"mmjobs report: {e}", file=sys.stderr)
        return 1
    notes = [f"{result.runs} runs", f"{len(result.plots)} plots", f"{len(result.tables)} tables"]
    if result.skipped:
        notes.append(f"{result.skipped} left out (listed in report.md)")
    if result.cached:
        notes.append("unchanged since the last report: reused")
    print(f"report: {result.report_md} ({', '.join(notes)})")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The full `mmjobs` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mmjobs",
        description="Fine-tune and evaluate multimodal LLMs as reproducible pipelines: "
                    "locally on embedded defaults, or on Kubernetes with Kubeflow Pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"mmjobs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config field, e.g. train.lr=2e-5")

    p = sub.add_parser("stage", help="run one pipeline stage (the container entrypoint)",
                       description="Run one stage: mmjobs stage NAME --config FILE --set k=v")
    p.add_argument("name", choices=STAGES, metavar="NAME", help=", ".join(STAGES))
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="--config FILE --set k=v ...")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("validate", help="check recipe files; reports every error at once")
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    overrides(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("prepare", help="convert a dataset to the canonical format (stage prepare)")
    p.add_argument("--from", dest="source_format", help="input format, e.g. llava, aihub-chart")
    p.add_argument("--input", help="input URI (local path or s3://)")
    p.add_argument("--output", help="output URI (default: the store layout)")
    p.add_argument("--image-root", dest="image_root", help="where the input's image paths point")
    p.add_argument("--num", type=int, help="generators (synthetic-charts): how many charts")
    p.add_argument("--seed", type=int, help="generators: random seed")
    p.add_argument("--config", help="stage config YAML")
    overrides(p)
    p.set_defaults(func=_stage_with_flags("prepare", {
        name: name for name in ("source_format", "input", "output", "image_root", "num", "seed")}))

    p = sub.add_parser("pretokenize", help="tokenize a canonical dataset into Parquet shards")
    p.add_argument("--dataset", help="canonical dataset URI (a prepare output)")
    p.add_argument("--model", help="model/processor URI")
    p.add_argument("--output", help="output URI (default: the content-addressed cache)")
    p.add_argument("--config", help="stage config YAML")
    overrides(p)
    p.set_defaults(func=_stage_with_flags("pretokenize", {"dataset": "dataset", "model": "model",
                                                          "output": "output"}))

    p = sub.add_parser("report", help="plots and comparison tables across an experiment's "
                                      "runs (stage report)")
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--run-id", dest="run_id",
                   help="only this pipeline (parent) run's stages (default: every run)")
    p.add_argument("--output", help="output URI (default: the store layout)")
    p.add_argument("--title", help="report title")
    p.add_argument("--sweep-param", dest="sweep_params", action="append", metavar="PARAM",
                   help="param telling sweep runs apart, e.g. train.lr_schedule (repeatable; "
                        "default: detected)")
    p.add_argument("--headline-metric", dest="headline_metrics", action="append",
                   metavar="METRIC", help="metric to tabulate and plot, e.g. scienceqa.Avg "
                                          "(repeatable; default: each run's headline)")
    p.add_argument("--force", action="store_true", help="rebuild even if nothing changed")
    p.add_argument("--config", help="stage config YAML")
    overrides(p)
    p.set_defaults(func=cmd_report)

    for name, (issue, what) in PLANNED.items():
        p = sub.add_parser(name, help=f"{what} (arrives with issue #{issue})")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_planned(name))

    # Parsed by mmjobs.eval.score.score_main (main() hands it the raw arguments).
    sub.add_parser("score", help="score a predictions file with an official metric: --metric "
                                 "NAME --predictions FILE [--variant V] [--tolerance T]")

    store = sub.add_parser("store", help="list and copy data between local paths and S3")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="ls|cp")
    p = store_sub.add_parser("ls", help="list objects under a URI and whether it is committed")
    p.add_argument("uri")
    p.set_defaults(func=cmd_store_ls)
    p = store_sub.add_parser("cp", help="copy a file or committed directory (verifies checksums)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--uncommitted", action="store_true",
                   help="copy a plain folder/prefix without a manifest (raw data) and commit it")
    p.add_argument("--workers", type=int, default=8, help="parallel transfers")
    p.set_defaults(func=cmd_store_cp)

    tracking = sub.add_parser("tracking", help="deliver tracking data spooled during an outage")
    tracking_sub = tracking.add_subparsers(dest="tracking_command", required=True, metavar="flush")
    p = tracking_sub.add_parser("flush", help="send spooled runs/metrics to the MLflow server")
    p.add_argument("path", nargs="?", help="a spool file or directory (default: MMJOBS_HOME's)")
    p.add_argument("--tracking-uri", help="deliver here instead of the server each run was for")
    p.set_defaults(func=cmd_tracking_flush)

    p = sub.add_parser("ui", help="start the MLflow UI on the embedded database")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("doctor", help="show resolved settings, reachability and versions")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Commands that own their flags (`--help` included) get the raw arguments.
    if argv[:1] == ["score"]:
        from mmjobs.eval.score import score_main

        return score_main(argv[1:])
    if argv[:1] == ["stage"] and len(argv) > 1 and not argv[1].startswith("-"):
        return cmd_stage(argparse.Namespace(name=argv[1], stage_args=argv[2:]))
    args = build_parser().parse_args(argv)
    from mmjobs.storage import StoreError

    try:
        return args.func(args)
    except StoreError as e:
        print(f"mmjobs {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
