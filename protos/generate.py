"""Regenerate the checked-in Python code for the public API: `python protos/generate.py`.

Writes distinfer/v1/inference_pb2.py, .pyi and inference_pb2_grpc.py under --out (default: the
repository root). tests/unit/test_proto_codegen.py regenerates into a temporary directory and diffs.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PROTO_FILES = ["distinfer/v1/inference.proto"]

logger = logging.getLogger("protos.generate")


def generate(out_dir: Path) -> list[Path]:
    """Run grpc_tools.protoc; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    stems = [Path(p).with_suffix("") for p in PROTO_FILES]
    return [out_dir / f"{s}{ext}" for s in stems for ext in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(args.out):
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
