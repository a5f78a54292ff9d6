"""`python -m mmjobs.models.replicas NAME OUT_DIR [--seed N]` (`--list` prints the names)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mmjobs.models.replicas import REPLICAS, build_replica


def main(argv: Sequence[str] | None = None) -> int:
    """Build one replica; exit 2 with a one-line message for an unknown name or a busy dir."""
    parser = argparse.ArgumentParser(
        prog="python -m mmjobs.models.replicas",
        description="Build a tiny replica of a seed base model from its published files.")
    parser.add_argument("name", nargs="?", help="hub id, e.g. llava-hf/llava-1.5-7b-hf")
    parser.add_argument("out_dir", nargs="?", help="new directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the replica names")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(REPLICAS))
        return 0
    if not args.name or not args.out_dir:
        parser.error("NAME and OUT_DIR are required (or --list)")
    try:
        print(build_replica(args.name, args.out_dir, seed=args.seed))
    except (KeyError, FileExistsError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
