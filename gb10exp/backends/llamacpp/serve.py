"""``python -m gb10exp.backends.llamacpp.serve --model F.gguf [--extra_bufts auto|on|off] ...``:
llama-cpp-python's OpenAI server (``python -m llama_cpp.server``, same arguments) with the CPU buffer types
``loader.py`` decides (and says why), set by ``loader.set_extra_bufts``: the server builds its ``Llama``."""

from __future__ import annotations

import argparse
import sys

from gb10exp.backends.llamacpp.loader import set_extra_bufts, use_extra_bufts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--extra_bufts", choices=("auto", "on", "off"), default="auto")
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    set_extra_bufts(use_extra_bufts({"auto": "auto", "on": True, "off": False}[ours.extra_bufts]))
    from llama_cpp.server.__main__ import main as serve

    sys.argv = [sys.argv[0], *rest]
    serve()


if __name__ == "__main__":
    main()
