"""Regenerate (or check) the Python stubs of protocol/proto/*.proto.

    python -m protocol.codegen          # rewrite the committed stubs
    python -m protocol.codegen --check  # exit 1 if the committed stubs are stale

Stubs are committed so that a plain install needs no protoc; the check runs in the test suite.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent / "proto"
ROOT = PROTO_DIR.parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install the dev extra (mypy-protobuf)")
    return found


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto into out_root (mirroring protocol/proto/); return the files."""
    protos = sorted(PROTO_DIR.glob("*.proto"))
    rel = [str(p.relative_to(ROOT)) for p in protos]
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *rel,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    out_dir = out_root / PROTO_DIR.relative_to(ROOT)
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Names of committed stub files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp))}
    committed = {
        p.name: p.read_bytes() for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    }
    names = set(fresh) | set(committed)
    return sorted(n for n in names if fresh.get(n) != committed.get(n))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: protocol/proto/{name}")
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PROTO_DIR / path.name)
            print(f"wrote protocol/proto/{path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
