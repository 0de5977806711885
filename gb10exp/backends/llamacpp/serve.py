"""``python -m gb10exp.backends.llamacpp.serve --model F.gguf [--extra_bufts auto|on|off] ...``:
llama-cpp-python's OpenAI server (``python -m llama_cpp.server``, same arguments) with llama.cpp's extra
buffer types off on CPUs with AMX (``auto``), where llama-cpp-python 0.3.36 segfaults in ``llama_decode``
with them. Its settings have no such field, so the parameter is set where both it and ``Llama`` read
their defaults (``worker.disable_extra_bufts``)."""

from __future__ import annotations

import argparse
import sys

from gb10exp.backends.llamacpp.worker import disable_extra_bufts, extra_bufts_default


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--extra_bufts", choices=("auto", "on", "off"), default="auto")
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not {"auto": extra_bufts_default(), "on": True, "off": False}[ours.extra_bufts]:
        disable_extra_bufts()
    from llama_cpp.server.__main__ import main as serve

    sys.argv = [sys.argv[0], *rest]
    serve()


if __name__ == "__main__":
    main()
