"""Write a pip requirements list for an image from pyproject.toml (the one source of versions).

    python3 docker/requirements.py pyproject.toml --select docker/data-packages.txt > req.txt
    python3 docker/requirements.py pyproject.toml --extras train,gpu > req.txt
    python3 docker/requirements.py pyproject.toml --build-system > build-req.txt

`--select FILE` keeps only the `[project.dependencies]` named in FILE (one name a line, `#`
comments): the lean `data` image installs a subset, with the version ranges of pyproject.
Without it every dependency is kept. `--extras` adds `[project.optional-dependencies]` groups.
`--build-system` lists `[build-system] requires` instead: the images install them with the
dependencies, so the package itself builds with --no-build-isolation (offline, in seconds).
A name in FILE or an extra that pyproject does not have is an error, so a renamed dependency
fails the image build instead of silently dropping out. Runs on the base image's Python
(3.11+: tomllib) before anything is installed, so it uses the standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def dist_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement string (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a package name from requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def read_names(path: Path) -> list[str]:
    """Package names listed in a selection file, normalized."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(dist_name(line))
    return names


def requirements(pyproject: Path, select: Path | None, extras: list[str]) -> list[str]:
    """The requirement strings for an image; raises ValueError naming what does not exist."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    core: list[str] = project.get("dependencies", [])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    errors = []
    if select is not None:
        wanted = read_names(select)
        known = {dist_name(r) for r in core}
        errors += [f"{select}: {n!r} is not in [project.dependencies] of {pyproject}"
                   for n in wanted if n not in known]
        core = [r for r in core if dist_name(r) in wanted]
    errors += [f"extra {e!r} is not in [project.optional-dependencies] of {pyproject} "
               f"(have: {', '.join(sorted(optional))})" for e in extras if e not in optional]
    if errors:
        raise ValueError("; ".join(errors))
    return core + [r for e in extras for r in optional[e]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--select", type=Path, help="keep only the dependencies named here")
    parser.add_argument("--extras", default="", help="comma-separated optional groups to add")
    parser.add_argument("--build-system", action="store_true",
                        help="print [build-system] requires instead")
    args = parser.parse_args(argv)
    if args.build_system:
        build = tomllib.loads(args.pyproject.read_text(encoding="utf-8"))["build-system"]
        sys.stdout.write("".join(f"{line}\n" for line in build["requires"]))
        return 0
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    try:
        lines = requirements(args.pyproject, args.select, extras)
    except ValueError as e:
        print(f"docker/requirements.py: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
