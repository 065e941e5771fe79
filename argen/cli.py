"""The `argen` command: one entry point, one sub-command per capability.

Each sub-command lives in the package that owns it, as a module with `main(argv) -> int | None` that builds its
own argparse parser (so `argen train --help` is that module's help). This file only dispatches and turns
ArgenError into a one-line message with exit status 2.
"""
from __future__ import annotations

import importlib
import sys

from argen.errors import ArgenError

# name -> (module with main(argv), one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("argen.model.zoo_cli", "list the model zoo with exact parameter counts"),
    "train": ("argen.launcher.train_cli", "train a GPT or a VQ tokenizer from a YAML recipe (one process to many nodes)"),
    "sample": ("argen.model.sample_cli", "sample codes/images from a GPT checkpoint"),
    "tokenize": ("argen.tokenize_offline.cli", "pre-tokenize images (and captions) into code shards"),
    "eval": ("argen.eval.cli", "sample at scale, score FID/IS/precision/recall/CLIP, watch a run"),
    "serve": ("argen.serve.cli", "HTTP sampling server over the fast engine"),
    "submit": ("argen.launcher.submit_cli", "submit training/tokenization/eval/scaling jobs to Slurm"),
    "plan": ("argen.launcher.plan_cli", "predict per-GPU memory of a layout and suggest layouts"),
    "convert": ("argen.model.convert_cli", "import LlamaGen checkpoints (llamagen-gpt, llamagen-vq)"),
    "demo": ("argen.demo", "run the whole pipeline on synthetic data in one process"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: argen <command> [args]  (argen <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from argen import __version__
        print(f"argen {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"argen: error: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"argen {name}: not available yet in this version of argen", file=sys.stderr)
            return 2
        raise
    try:
        rc = module.main(rest)
    except ArgenError as e:
        print(f"argen {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"argen {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
