"""Generates the Python code of protos/ into shared/proto/ (`make proto`).

protoc writes imports as `from raven.training.v1 import x_pb2`; they are
rewritten to live under this package so that no path tricks are needed.
"""

from __future__ import annotations

import re
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
OUT = Path(__file__).resolve().parent
PACKAGE = "shared.proto"
_IMPORT = re.compile(r"^from raven\.(\S+) import", re.MULTILINE)


def main() -> int:
    generated = OUT / "raven"
    shutil.rmtree(generated, ignore_errors=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={OUT}",
            f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}",
            *sources,
        ]
    )
    if code != 0:
        return code
    for path in generated.rglob("*.py*"):
        text = path.read_text()
        path.write_text(_IMPORT.sub(rf"from {PACKAGE}.raven.\1 import", text))
    for folder in [generated, *(p for p in generated.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    print(f"generated {len(sources)} protos into {generated.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
