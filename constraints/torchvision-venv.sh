#!/usr/bin/env bash
# Builds .venv-torchvision (`make .venv-torchvision/.installed`): torch + torchvision built as a
# pair (constraints/torchvision.txt), and nothing else of its own. Every other package, mmjobs
# included, comes from the main .venv through a .pth file (site.addsitedir runs after this venv's
# own site-packages, so its torch shadows .venv's CPU torch), and .venv's versions pin the
# shared dependencies, so both venvs see the same numpy and pillow. Triton (0.9 GB, only
# torch.compile's GPU kernels use it) is left out. A second full install cost ~2.4 GB more disk
# and minutes of CI time: CI's disk is shared and has run out.
#   usage: constraints/torchvision-venv.sh PYTHON MAIN_VENV TV_VENV
set -euo pipefail
python="$1" main_venv="$2" tv_venv="$3"
pins="$tv_venv/main-venv-pins.txt"
requirements="$tv_venv/torch-requirements.txt"

rm -rf "$tv_venv"
"$python" -m venv "$tv_venv"
tv_python="$tv_venv/bin/python"
"$tv_python" -m pip install --quiet --upgrade pip
"$main_venv/bin/python" -m pip freeze --exclude-editable \
    | grep -v -E '^(torch|torchvision|triton|nvidia-[^=]*)==' > "$pins"
"$tv_python" -m pip install --quiet --no-deps -r constraints/torchvision.txt
# What torch and torchvision require (markers kept: pip evaluates them), but triton.
"$tv_python" - "$requirements" <<'PY'
import sys
from importlib.metadata import requires

wanted = [req for dist in ("torch", "torchvision") for req in requires(dist) or []
          if "extra ==" not in req and not req.startswith(("triton", "torch"))]
open(sys.argv[1], "w").write("\n".join(wanted) + "\n")
PY
# --no-warn-conflicts: pip would report the missing triton, left out on purpose.
"$tv_python" -m pip install --quiet --no-warn-conflicts -c constraints/torchvision.txt -c "$pins" \
    -r "$requirements"

main_site="$("$main_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
tv_site="$("$tv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf 'import site; site.addsitedir(%s)\n' "'$main_site'" > "$tv_site/mmjobs-main-venv.pth"

"$tv_python" -c 'import torch, torchvision, torchvision.ops, transformers, mmjobs, pytest
print("torchvision venv: torch", torch.__version__, "torchvision", torchvision.__version__)'
