"""Write a pip requirements list for an image from pyproject.toml (the one source of versions).

    python3 docker/requirements.py pyproject.toml --select docker/data-packages.txt > req.txt
    python3 docker/requirements.py pyproject.toml --extras train,gpu > req.txt
    python3 docker/requirements.py pyproject.toml --build-system > build-req.txt

`--select FILE` keeps only the packages named in FILE (one name a line, `#` comments): the
lean `data` image installs a subset, with the version ranges of pyproject. A name is looked up
in `[project.dependencies]`, then in the `[project.optional-dependencies]` groups (the first
group that has it), so a server-side package pyproject lists only for tests (`psycopg2-binary`
in `dev`) keeps one range. A name may carry extras (`mlflow[auth]`): they are added to the
requirement pyproject gives (`mlflow[auth]>=3.17,<4`). Without FILE every dependency is kept.
`--extras` adds `[project.optional-dependencies]` groups.
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

_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?(.*)", re.DOTALL)


def split(requirement: str) -> tuple[str, list[str], str]:
    """(normalized name (PEP 503), extras, the rest: version range and marker)."""
    match = _REQUIREMENT.fullmatch(requirement)
    if not match:
        raise ValueError(f"cannot read a package name from requirement {requirement!r}")
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return name, extras, match.group(3).strip()


def dist_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement string (PEP 503)."""
    return split(requirement)[0]


def with_extras(requirement: str, extras: list[str]) -> str:
    """`requirement` with `extras` added to the ones it has (`mlflow>=3` -> `mlflow[auth]>=3`)."""
    if not extras:
        return requirement
    name, have, rest = split(requirement)
    merged = ",".join(sorted(set(have) | set(extras)))
    return f"{name}[{merged}]{' ' if rest.startswith('@') else ''}{rest}"


def read_names(path: Path) -> list[tuple[str, list[str]]]:
    """(normalized name, extras) of each package listed in a selection file."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, extras, rest = split(line)
            if rest:
                raise ValueError(f"{line!r}: no versions here, pyproject.toml has them")
            names.append((name, extras))
    return names


def select_requirements(wanted: list[tuple[str, list[str]]], core: list[str],
                        optional: dict[str, list[str]], where: str) -> list[str]:
    """The requirements named in `wanted`: from `core` (in its order), then from the first
    optional group that has each of the others; raises ValueError naming the missing ones."""
    extras = dict(wanted)
    chosen = [with_extras(r, extras[dist_name(r)]) for r in core if dist_name(r) in extras]
    found = {dist_name(r) for r in core}
    missing = []
    for name, name_extras in wanted:
        if name in found:
            continue
        requirement = next((r for group in optional.values() for r in group
                            if dist_name(r) == name), None)
        if requirement is None:
            missing.append(name)
            continue
        chosen.append(with_extras(requirement, name_extras))
        found.add(name)
    if missing:
        raise ValueError("; ".join(f"{n!r} is not in [project.dependencies] nor in "
                                   f"[project.optional-dependencies] of {where}"
                                   for n in missing))
    return chosen


def requirements(pyproject: Path, select: Path | None, extras: list[str]) -> list[str]:
    """The requirement strings for an image; raises ValueError naming what does not exist."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    core: list[str] = project.get("dependencies", [])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    errors = []
    if select is not None:
        try:
            core = select_requirements(read_names(select), core, optional, str(pyproject))
        except ValueError as e:
            errors.append(f"{select}: {e}")
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
