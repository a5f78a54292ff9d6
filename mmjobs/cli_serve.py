"""`mmjobs serve` and `mmjobs chat`: one model, several named ones, or a finished run's settings
behind one server (the serve stage; see mmjobs.stages.serve)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from typing import Any

StageRunner = Callable[[str, dict[str, str]], Callable[[argparse.Namespace], int]]
__all__ = ["add_serve_commands"]


def add_serve_commands(sub: Any, overrides: Callable[[argparse.ArgumentParser], None],
                       stage_with_flags: StageRunner,
                       recipe_errors: Callable[[str, Callable[[], int]], int]) -> None:
    """Add `serve` and `chat` to the `mmjobs` subcommands `sub` (helpers from mmjobs.cli)."""

    from mmjobs.serve.limits import limits_help  # dataclasses only: cheap to import

    def serve(args: argparse.Namespace) -> int:
        return _serve(args, stage_with_flags)

    def chat(args: argparse.Namespace) -> int:
        return _chat(args, stage_with_flags, recipe_errors)

    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API with a "
                                     "chat page (stage serve; Ctrl-C stops it)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill(
                           "Serve MODEL_URI (merged, or base + --adapter), or several named "
                           "models (--model NAME=URI, repeated; --run RUN_DIR: every swept "
                           "setting of a finished run): POST /v1/chat/completions, GET "
                           "/v1/models, the chat page at / (a selector when several), "
                           "/healthz, /readyz, /metrics. More settings: --set, e.g. "
                           "--set max_batch_size=16 --set allow_image_urls=true.", 79),
                       epilog=limits_help())
    p.add_argument("model", metavar="MODEL_URI", nargs="?",
                   help="model dir, s3:// committed dir or hub id")
    p.add_argument("--model", dest="models", action="append", metavar="NAME=URI",
                   help="serve this model as NAME too (repeat for more; NAME=URI,adapter=URI "
                        "for base + adapter); the first is the chat page's default")
    p.add_argument("--run", metavar="RUN_DIR", help="serve each committed merge-<setting> of "
                   "this finished run as <setting> ({store}/{experiment}/{run_id})")
    p.add_argument("--adapter", metavar="URI", help="LoRA adapter, or a training output "
                   "holding final/adapter")
    _server_flags(p)
    p.add_argument("--config", help="stage config YAML")
    overrides(p)
    p.set_defaults(func=serve)

    p = sub.add_parser("chat", help="serve every swept setting of a recipe's finished local "
                                    "run behind one chat page (mmjobs serve --run)",
                       description="Find the run `mmjobs run RECIPE [--set ...] [--run-id]` "
                       "wrote and serve each of its merged settings, e.g. mmjobs chat "
                       "pipelines/recipes/lavin-sweep.yaml; open the printed URL.")
    p.add_argument("recipe", metavar="RECIPE", help="the recipe the run was made from")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="the recipe overrides the run was made with")
    p.add_argument("--run-id", help="the run id, if `mmjobs run` was given one")
    _server_flags(p)
    p.set_defaults(func=chat)


def _server_flags(p: argparse.ArgumentParser) -> None:
    """Where and how a server listens, and how many models it keeps in memory."""
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--api-key-env", dest="api_key_env", metavar="NAME",
                   help="environment variable holding the API key clients must send as a "
                        "Bearer token (default: no auth)")
    p.add_argument("--max-loaded-models", dest="max_loaded_models", type=int, metavar="N",
                   help="most models in memory at once (default: all)")


_SERVE_FLAGS = {"model": "model", "adapter": "adapter", "host": "host", "port": "port",
                "api_key_env": "key_env", "run": "run",
                "max_loaded_models": "max_loaded_models"}


def _serve(args: argparse.Namespace, stage_with_flags: StageRunner) -> int:
    """`mmjobs serve`: the serve stage, with each --model NAME=URI as an entry of `models`."""
    import json

    from mmjobs.serve.config import parse_model_flag

    overrides = list(args.overrides)
    if args.models:
        try:
            entries = [parse_model_flag(text).model_dump(exclude_none=True)
                       for text in args.models]
        except ValueError as e:
            print(f"mmjobs serve: {e}", file=sys.stderr)
            return 2
        if args.model:  # the positional model joins the list, first
            from mmjobs.serve.config import default_model_name

            entries.insert(0, {"name": default_model_name(args.model), "model": args.model,
                               **({"adapter": args.adapter} if args.adapter else {})})
            args.model = args.adapter = None
        overrides.append(f"models={json.dumps(entries)}")  # JSON is flow YAML
    args.overrides = overrides
    return stage_with_flags("serve", _SERVE_FLAGS)(args)


def _chat(args: argparse.Namespace, stage_with_flags: StageRunner,
          recipe_errors: Callable[[str, Callable[[], int]], int]) -> int:
    """`mmjobs chat RECIPE`: `mmjobs serve --run` on the folder `mmjobs run RECIPE` wrote."""
    from mmjobs.pipeline_runner import run_dir

    def run() -> int:
        folder = run_dir(args.recipe, args.overrides, args.run_id)
        print(f"mmjobs chat: serving the settings of {folder}", file=sys.stderr)
        serve = argparse.Namespace(config=None, overrides=[], model=None, adapter=None,
                                   models=None, run=folder, host=args.host, port=args.port,
                                   api_key_env=args.api_key_env,
                                   max_loaded_models=args.max_loaded_models)
        return _serve(serve, stage_with_flags)

    return recipe_errors("chat", run)
