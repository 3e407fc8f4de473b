"""Write the locks that `make` installs from: requirements/lock.txt and requirements/lock-floor.txt.

    python requirements/lock.py [--torch torch==2.13.0]      (what `make lock` runs)

The requirements are pyproject.toml's: the build requirements, and the extras hf, eval, models and test.
(requirements/no-deps.txt, installed with --no-deps, is pinned by hand: packages whose own
dependencies msattn does not want.)
- lock.txt (the newest end, used by `make test`, `make demo` and the top end of `make test-compat`):
  what pip resolves for those ranges today, in a new virtual environment.
- lock-floor.txt (the floor end of `make test-compat`): the same, with the HF stack (transformers,
  peft, accelerate) at the lower bound of its range.
torch is not in the locks: the Makefile's TORCH pins it, so a torch already in .venv (a CUDA build,
say) can be kept. Each lock is `pip freeze` of its environment: every package, exact versions.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORED = ("transformers", "peft", "accelerate")


def requirements() -> list[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    build = [r for r in project["build-system"]["requires"] if not r.startswith("torch")]
    extras = project["project"]["optional-dependencies"]
    return build + extras["hf"] + extras["eval"] + extras["models"] + extras["test"]


def floor(requirement: str) -> str:
    """``transformers>=5.17,<5.26`` -> ``transformers==5.17`` for the HF stack; others unchanged."""
    name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0]
    low = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
    if name.lower() not in FLOORED:
        return requirement
    if low is None:
        raise SystemExit(f"lock.py: {requirement!r} has no lower bound to test")
    return f"{name}=={low[1]}"


def freeze(reqs: list[str], torch: str, path: str, header: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        venv = os.path.join(tmp, "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        py = os.path.join(venv, "bin", "python")
        subprocess.run([py, "-m", "pip", "install", "-q", torch, *reqs], check=True)
        out = subprocess.run([py, "-m", "pip", "freeze", "--all", "--exclude", "pip", "--exclude", "torch"],
                             check=True, capture_output=True, text=True).stdout
    with open(path, "w") as f:
        f.write(header + out)
    print(f"wrote {os.path.relpath(path, ROOT)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", default="torch==2.13.0", help="the torch the locks are resolved with")
    args = ap.parse_args()
    reqs = requirements()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    note = (f"# Written by `make lock` (requirements/lock.py) with Python {py} and {args.torch}; do not edit.\n"
            "# Installed with `pip install -r` by the Makefile; torch is pinned there (TORCH).\n")
    freeze(reqs, args.torch, os.path.join(ROOT, "requirements", "lock.txt"),
           note + "# The newest end: pip's resolution of pyproject.toml's ranges.\n")
    freeze([floor(r) for r in reqs], args.torch, os.path.join(ROOT, "requirements", "lock-floor.txt"),
           note + f"# The floor end: {', '.join(FLOORED)} at the lower bounds of their ranges.\n")


if __name__ == "__main__":
    main()
