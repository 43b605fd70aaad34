"""Builds deft-client, generating the gRPC stubs from proto/deft/v1 at build time.

The protos are the repository's (../../proto/deft/v1 from here), or the directory named by
DEFT_PROTO_DIR. They are compiled with grpc_tools.protoc (a build requirement, pyproject.toml)
into deft_client/proto/ of the build: the virtual include path `deft_client/proto=<dir>` makes
the generated modules import each other as `deft_client.proto.*`, so nothing lands in a
top-level `deft` package. Regenerate by rebuilding: `pip install clients/python`.
"""
import os
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent


def proto_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("DEFT_PROTO_DIR", HERE / ".." / ".." / "proto" / "deft" / "v1"))
    if not list(d.glob("*.proto")):
        raise SystemExit(f"deft-client: no .proto files in {d} (set DEFT_PROTO_DIR)")
    return d.resolve()


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc  # build requirement
    import grpc_tools

    src = proto_dir()
    pkg = out_dir / "deft_client" / "proto"
    pkg.mkdir(parents=True, exist_ok=True)
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(f"deft_client/proto/{p.name}" for p in src.glob("*.proto"))
    args = ["protoc", f"-Ideft_client/proto={src}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}",
            *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"deft-client: protoc failed on {protos}")
    init = pkg / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from proto/deft/v1 at build time (see setup.py)."""\n')


class BuildPyWithProtos(build_py):
    def run(self):
        super().run()
        generate(pathlib.Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithProtos})
