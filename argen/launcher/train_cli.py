"""`argen train CONFIG [key=value ...]`: train a GPT (kind: gpt, the default) or a VQ tokenizer (kind: vq).

The YAML's top-level `kind` picks the loop. Launch is detected from the environment (torchrun, srun or a single
process); the layout comes from the config's `parallel` section. `--print-config` prints the resolved config and
exits without training.
"""
from __future__ import annotations

import argparse
import sys

from argen.config import load_config, parse_overrides, read_yaml, to_yaml
from argen.errors import ArgenError


def _kind(path: str, overrides: list[str]) -> str:
    data = read_yaml(path)
    kind = parse_overrides(overrides).get("kind", data.get("kind", "gpt"))
    return str(kind)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="argen train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML recipe (configs/gpt-*.yaml, configs/t2i-*.yaml, a VQ recipe)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 parallel.tp=2")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    kind = _kind(args.config, args.overrides)
    if kind == "vq":
        if args.print_config:
            raise ArgenError("--print-config is for GPT recipes; the VQ loop prints its own config at start")
        from argen.launcher import train_vq
        return int(train_vq.run(args.config, args.overrides) or 0)
    if kind != "gpt":
        raise ArgenError(f"kind: unknown training kind '{kind}' (gpt or vq)")
    from argen.launcher.train_config import TrainConfig
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from argen.launcher.train_gpt import run
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
