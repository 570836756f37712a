"""Generates the Python code of protos/ (`make proto`) into shared/proto/ and into the
client package's client/raven_client/_proto/, and the descriptor set that reflection
serves (shared/proto/raven/descriptors.binpb: every file with its comments).

protoc writes imports as `from raven.training.v1 import x_pb2`; they are
rewritten to live under each package so that no path tricks are needed.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
OUT = Path(__file__).resolve().parent
PACKAGE = "shared.proto"
# The client package's stubs; generated only where the client's sources are.
CLIENT_PACKAGE_DIR = ROOT / "client" / "raven_client"
CLIENT_OUT = CLIENT_PACKAGE_DIR / "_proto"
CLIENT_PACKAGE = "raven_client._proto"
DESCRIPTOR_SET = "descriptors.binpb"
_IMPORT = re.compile(r"^from raven\.(\S+) import", re.MULTILINE)


def _protoc(sources: list[str], *flags: str) -> int:
    well_known = str(resources.files("grpc_tools") / "_proto")
    return int(
        protoc.main(["grpc_tools.protoc", f"-I{PROTOS}", f"-I{well_known}", *flags, *sources])
    )


def _install(built: Path, out: Path, package: str) -> None:
    """Copies protoc's `raven/` tree into `out`, imports rewritten to `package`."""
    target = out / "raven"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(built / "raven", target)
    for path in target.rglob("*.py*"):
        text = path.read_text()
        path.write_text(_IMPORT.sub(rf"from {package}.raven.\1 import", text))
    for folder in [out, target, *(p for p in target.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def main() -> int:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        built = Path(scratch)
        code = _protoc(
            sources, f"--python_out={built}", f"--pyi_out={built}", f"--grpc_python_out={built}"
        )
        if code != 0:
            return code
        _install(built, OUT, PACKAGE)
        targets = [OUT / "raven"]
        if CLIENT_PACKAGE_DIR.is_dir():
            _install(built, CLIENT_OUT, CLIENT_PACKAGE)
            targets.append(CLIENT_OUT / "raven")
    descriptors = OUT / "raven" / DESCRIPTOR_SET
    code = _protoc(
        sources, "--include_source_info", "--include_imports", f"--descriptor_set_out={descriptors}"
    )
    if code != 0:
        return code
    shown = ", ".join(str(t.relative_to(ROOT)) for t in targets)
    print(f"generated {len(sources)} protos into {shown} (and {DESCRIPTOR_SET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
