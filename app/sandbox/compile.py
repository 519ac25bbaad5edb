"""`python -m app.sandbox.compile <wasm> <out>`: compile the runtime to a .cwasm, in its own process."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from wasmtime import Engine, Module

from app.sandbox.module_cache import engine_config


def compile_to(wasm: Path, out: Path) -> None:
    engine = Engine(engine_config())
    artifact = Module.from_file(engine, wasm).serialize()
    # What a server then loads without trying first (ensure_compiled(load=False)) must load.
    Module.deserialize(engine, artifact)
    # Write beside the target and rename: readers (and a server that mmaps the old file)
    # only ever see a complete artifact.
    fd, temp_name = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(artifact)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, out)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m app.sandbox.compile <wasm> <out.cwasm>\n")
        return 2
    compile_to(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
