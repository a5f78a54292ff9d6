"""The `mmjobs` command line.

Subcommands import their heavy dependencies (torch, transformers, mlflow) only when run, so
`mmjobs --help` and `mmjobs validate` stay fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence

from mmjobs import __version__
from mmjobs.stages import registry

# --------------------------------------------------------------------------- handlers


def cmd_validate(args: argparse.Namespace) -> int:
    from mmjobs import pipeline_runner

    return pipeline_runner.validate(args.recipes, args.overrides)


def _recipe_errors(command: str, fn: Callable[[], int]) -> int:
    """Run a recipe command; config errors, failed steps and an unreachable KFP API print as
    messages, not traces."""
    from mmjobs import pipeline_runner
    from mmjobs.config import ConfigError

    try:
        return fn()
    except (ConfigError, pipeline_runner.PipelineError, pipeline_runner.SubmitError) as e:
        if os.environ.get("MMJOBS_DEBUG"):
            raise
        if isinstance(e, ConfigError):
            print(e, file=sys.stderr)
            return 2
        print(f"mmjobs {command}: {e}", file=sys.stderr)
        return 1


def cmd_run(args: argparse.Namespace) -> int:
    from mmjobs import pipeline_runner

    def run() -> int:
        outcome = pipeline_runner.run_local(args.recipe, args.overrides, run_id=args.run_id,
                                            verbose=args.verbose)
        pipeline_runner.print_outcome(args.recipe, outcome)
        return 0

    return _recipe_errors("run", run)


def cmd_compile(args: argparse.Namespace) -> int:
    from mmjobs import pipeline_runner

    def run() -> int:
        run_id = pipeline_runner.compile_recipe(args.recipe, args.output, args.overrides,
                                                run_id=args.run_id)
        where = f"run id {run_id}" if run_id else "each run's KFP job id"
        print(f"wrote {args.output} (KFP IR; outputs under {where}); upload it in the "
              "KFP UI or: mmjobs submit")
        return 0

    return _recipe_errors("compile", run)


def cmd_submit(args: argparse.Namespace) -> int:
    from mmjobs import pipeline_runner

    def run() -> int:
        url = pipeline_runner.submit(args.recipe, args.host, args.overrides,
                                     experiment=args.experiment, no_cache=args.no_cache,
                                     run_id=args.run_id)
        print(f"submitted: {url}")
        return 0

    return _recipe_errors("submit", run)


def cmd_stage(args: argparse.Namespace) -> int:
    try:
        stage = registry.get(args.name)
    except registry.UnknownStageError as e:
        print(f"mmjobs stage: {e}", file=sys.stderr)
        return 2
    return stage.cli(args.stage_args)


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


def printable(text: str, *, name: bool = False) -> str:
    """`text` safe to print on a terminal: control characters (C0, DEL, C1), line and paragraph
    separators, bidirectional overrides and lone surrogates (undecodable bytes in a file name)
    are escaped (`\\n`, `\\x1b`, `\\u202e`), so a crafted name cannot fake lines, move the
    cursor or recolour output. With `name`, backslashes are doubled too, keeping it unambiguous.
    """
    pattern = _UNPRINTABLE_NAME if name else _UNPRINTABLE
    return pattern.sub(lambda m: _ESCAPES.get(m.group()) or (
        f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"),
        text)


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e"
                          r"\u2066-\u2069\ud800-\udfff]")
_UNPRINTABLE_NAME = re.compile(_UNPRINTABLE.pattern[:-1] + r"\\]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def cmd_store_ls(args: argparse.Namespace) -> int:
    """List a directory and say whether it is committed, checking it against its manifest.

    Exit 1 if there is nothing, or the manifest lists objects that are missing or damaged.
    """
    from mmjobs import storage

    check = storage.check_dir(args.uri, checksums=args.verify)
    notes = {**{rel: "not in the manifest: a leftover, not part of the committed directory"
                for rel in check.extras}, **check.problems}
    for obj in check.objects:
        note = notes.pop(obj.relpath, None)
        print(f"{obj.size:>12}  {printable(obj.relpath, name=True)}"
              + (f"  <- {printable(note)}" if note else ""))
    for rel, note in notes.items():  # listed in the manifest but not there
        if rel != storage.MANIFEST_NAME:
            print(f"{'-':>12}  {printable(rel, name=True)}  <- {printable(note)}")
    total = sum(o.size for o in check.objects)
    head = f"{len(check.objects)} objects, {total} bytes — "
    if check.manifest is None:
        if storage.MANIFEST_NAME in check.problems:
            print(head + printable(check.problems[storage.MANIFEST_NAME]) + " (not committed)")
            return 1
        if not check.objects:
            print(f"{printable(args.uri, name=True)}: no objects there")
            return 1
        print(head + f"no {storage.MANIFEST_NAME} (not committed)")
        return 0
    files = len(check.manifest.files)
    if check.problems:
        print(head + f"DAMAGED: {len(check.problems)} of the {files} files its "
              f"{storage.MANIFEST_NAME} lists are missing or wrong (marked above), so it is not "
              "a usable committed directory; re-run the step that wrote it, or copy it again "
              "from a good source")
        return 1
    how = "size and sha256" if check.checksums else "size (--verify also checks sha256)"
    extras = (f"; {len(check.extras)} other objects are not part of it (marked above)"
              if check.extras else "")
    print(head + f"committed: all {files} files its manifest lists are there, checked by "
          f"{how}{extras}")
    return 0


def cmd_store_cp(args: argparse.Namespace) -> int:
    from mmjobs import storage

    if args.uncommitted:
        print(printable(storage.copy_uncommitted(args.src, args.dst, workers=args.workers)))
    else:
        print(printable(storage.copy(args.src, args.dst, workers=args.workers)))
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


def cmd_import(args: argparse.Namespace) -> int:
    """`mmjobs import SOURCE --to URI`: the import stage; fetch and archive errors are messages."""
    import json

    from mmjobs.data.archives import ArchiveError
    from mmjobs.data.fetch import FetchError

    flags = {"source": args.source, "to": args.to, "repo_type": args.repo_type,
             "revision": args.revision, "include": args.include, "exclude": args.exclude,
             "sha256": args.sha256, "extract": args.extract, "max_bytes": args.max_bytes,
             "max_members": args.max_members, "force": args.force or None}
    forwarded = [] if args.config is None else ["--config", args.config]
    # JSON is YAML, so a revision like "2024" stays a string and patterns stay a list.
    for field, value in flags.items():
        if value is not None:
            forwarded += ["--set", f"{field}={json.dumps(value)}"]
    for override in args.overrides:
        forwarded += ["--set", override]
    try:
        return cmd_stage(argparse.Namespace(name="import", stage_args=forwarded))
    except (FetchError, ArchiveError) as e:
        print(f"mmjobs import: {printable(str(e))}", file=sys.stderr)
        return 1


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
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks of user errors too (also in pipeline "
                             "steps: sets MMJOBS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config field, e.g. train.lr=2e-5")

    p = sub.add_parser("stage", help="run one pipeline stage (the container entrypoint)",
                       description="Run one stage: mmjobs stage NAME --config FILE --set k=v")
    stages = registry.names()
    p.add_argument("name", choices=stages, metavar="NAME", help=", ".join(stages))
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="--config FILE --set k=v ...")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("run", help="run a recipe's pipeline locally (KFP local runner; "
                                   "embedded store and MLflow unless the environment says so)")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML, e.g. "
                   "pipelines/recipes/chart-demo.yaml, or a bundled recipe's name: chart-demo")
    overrides(p)
    p.add_argument("--run-id", help="output folder / pipeline run id (default: a fingerprint of "
                   "the resolved recipe, so an identical re-run reuses finished steps)")
    p.add_argument("--verbose", action="store_true", help="show KFP's executor logs too")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="compile a recipe to KFP pipeline YAML for a cluster")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("-o", "--output", required=True, metavar="FILE.yaml")
    overrides(p)
    p.add_argument("--run-id", help="run id baked into the output paths, so runs naming it "
                   "reuse each other's outputs (default: each run's KFP job id)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("submit", help="submit a recipe to a Kubeflow Pipelines endpoint")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--host", required=True, metavar="URL", help="KFP API endpoint")
    p.add_argument("--experiment", help="KFP experiment (default: the recipe's experiment)")
    p.add_argument("--no-cache", action="store_true", help="disable KFP's step cache")
    overrides(p)
    p.add_argument("--run-id", help="run id baked into the output paths, so runs naming it "
                   "reuse each other's outputs (default: each run's KFP job id)")
    p.set_defaults(func=cmd_submit)

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

    p = sub.add_parser("train", help="train a model on pretokenized shards (stage train)")
    p.add_argument("--config", help="stage config YAML (see README: Training)")
    p.add_argument("--model", help="base model URI (sets model.name_or_path)")
    p.add_argument("--data", help="pretokenized shards URI")
    p.add_argument("--mode", help="align | sft | dpo | rm | ppo | grpo (sets train.mode; the "
                                  "settings of each mode: README Training)")
    p.add_argument("--output", help="output URI (default: the store layout)")
    overrides(p)
    p.set_defaults(func=_stage_with_flags("train", {"model": "model.name_or_path", "data": "data",
                                                    "mode": "train.mode", "output": "output"}))

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

    p = sub.add_parser("import", help="copy a model or dataset from the Hugging Face hub, a URL "
                                      "or another store into the store (stage import)")
    p.add_argument("source", metavar="SOURCE", help="hf://org/name (or org/name), an "
                   "http(s):// URL of a file or archive, or a store path (local or s3://)")
    p.add_argument("--to", required=True, metavar="URI", help="where the committed copy goes")
    p.add_argument("--repo-type", dest="repo_type", choices=("model", "dataset"),
                   help="hub sources: kind of repo (default model)")
    p.add_argument("--revision", metavar="R", help="hub sources: branch, tag or commit "
                   "(default main; recorded as the commit sha)")
    p.add_argument("--include", action="append", metavar="PAT",
                   help="hub sources: only files matching this glob (repeatable)")
    p.add_argument("--exclude", action="append", metavar="PAT",
                   help="hub sources: skip files matching this glob (repeatable)")
    p.add_argument("--sha256", metavar="HEX", help="URL/file sources: expected sha256; a "
                   "mismatch fails and commits nothing")
    p.add_argument("--extract", choices=("auto", "always", "never"),
                   help="URL/file sources: unpack archives (default auto: by file name)")
    p.add_argument("--max-bytes", dest="max_bytes", type=int, metavar="N",
                   help="refuse a download, or an archive extracting to, more bytes than this "
                   "(default 100 GiB)")
    p.add_argument("--max-members", dest="max_members", type=int, metavar="N",
                   help="refuse archives with more members than this (default 2,000,000)")
    p.add_argument("--force", action="store_true", help="import again even if an identical "
                   "copy is already committed at --to")
    p.add_argument("--config", help="stage config YAML")
    overrides(p)
    p.set_defaults(func=cmd_import)

    from mmjobs.cli_serve import add_serve_commands

    add_serve_commands(sub, overrides, _stage_with_flags, _recipe_errors)

    # Parsed by mmjobs.plan.report.main (main() hands it the raw arguments).
    sub.add_parser("plan", help="real-size dry run of a recipe's training steps on the meta "
                                "device: parameters, memory per GPU, fits or not, FLOPs")
    # Parsed by mmjobs.eval.score.score_main (main() hands it the raw arguments).
    sub.add_parser("score", help="score a predictions file with an official metric: --metric "
                                 "NAME --predictions FILE [--variant V] [--tolerance T] "
                                 "[--format F --ground-truth URI]")

    store = sub.add_parser("store", help="list and copy data between local paths and S3")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="ls|cp")
    p = store_sub.add_parser("ls", help="list objects under a URI and whether it is committed "
                                        "(checked against its manifest)")
    p.add_argument("uri")
    p.add_argument("--verify", action="store_true", help="also read every file the manifest "
                   "lists and check its sha256 (default: sizes only)")
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
    if argv[:1] == ["plan"]:
        from mmjobs.plan.report import main as plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["stage"] and len(argv) > 1 and not argv[1].startswith("-"):
        return cmd_stage(argparse.Namespace(name=argv[1], stage_args=argv[2:]))
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["MMJOBS_DEBUG"] = "1"  # the steps a run starts inherit it
    from mmjobs.storage import StoreError

    try:
        return args.func(args)
    except StoreError as e:
        if args.debug:
            raise
        print(f"mmjobs {args.command}: {printable(str(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
