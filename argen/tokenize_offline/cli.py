"""`argen tokenize`: pre-tokenize images (and captions) into uint16 code shards plus manifest.json."""
from __future__ import annotations

import argparse
import sys

from argen.config import load_config

EPILOG = """\
examples:
  # the synthetic demo set with a local VQ export, into local shards
  argen tokenize configs/tokenize-synthetic.yaml vq.path=runs/vq-tiny/export output.url=data/synthetic-codes

  # ImageNet class folders to S3 (AWS_ENDPOINT_URL etc. from the environment)
  argen tokenize configs/tokenize-imagenet.yaml source.path=/data/imagenet/train output.url=s3://bucket/imagenet256

  # a Slurm array of 16 tasks (parts come from SLURM_ARRAY_TASK_ID/COUNT), then one finalize step
  sbatch --array=0-15 --wrap "argen tokenize configs/tokenize-imagenet.yaml"
  argen tokenize configs/tokenize-imagenet.yaml --finalize

  # explicit parts (any split; reruns resume and skip finished shards)
  argen tokenize CONFIG --part 0 --parts 2 ; argen tokenize CONFIG --part 1 --parts 2 ; argen tokenize CONFIG --finalize

Parts come from --part/--parts, else a Slurm array, else torchrun's RANK/WORLD_SIZE (rank 0 then waits for
the others and finalizes), else one part (which finalizes itself). Killed jobs resume where they stopped.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="argen tokenize", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML recipe (configs/tokenize-*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output.url=s3://b/p source.limit=100")
    p.add_argument("--part", type=int, default=None, help="this process's part index (with --parts)")
    p.add_argument("--parts", type=int, default=None, help="number of parts the job is split into")
    p.add_argument("--finalize", action="store_true", help="only write manifest.json once every part is done")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="with --finalize: wait up to this long for unfinished parts")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished data set made with a different config at output.url")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from argen.tokenize_offline.config import TokenizeConfig
    from argen.tokenize_offline.job import TokenizeJob, resolve_part, summary_lines

    cfg = load_config(TokenizeConfig, args.config, args.overrides)
    if args.no_progress:
        cfg.progress = False

    def log(msg: str) -> None:
        print(f"argen tokenize: {msg}", file=sys.stderr, flush=True)

    job = TokenizeJob(cfg, log=log)

    def print_manifest(m) -> int:
        for line in summary_lines({}, m):
            print(line)
        print(f"manifest: {job.prefix}/manifest.json")
        return 0

    if args.finalize:
        return print_manifest(job.finalize(wait_s=args.wait))
    part = resolve_part(args.part, args.parts)
    stats = job.run_part(part, overwrite=args.overwrite)
    if stats.get("complete"):
        return 0
    for line in summary_lines(stats):
        print(line)
    if part.count == 1:
        m = job.finalize()
    elif part.origin == "torchrun" and part.index == 0:
        log("waiting for the other ranks to finish before writing the manifest")
        m = job.finalize(wait_s=7 * 24 * 3600.0, poll_s=2.0)
    elif part.origin == "torchrun":
        print(f"part {part.index}/{part.count} done; rank 0 writes the manifest when every rank is done")
        return 0
    else:
        print(f"part {part.index}/{part.count} done; when every part is done run: "
              f"argen tokenize {args.config} {' '.join(args.overrides)} --finalize".rstrip())
        return 0
    return print_manifest(m)


if __name__ == "__main__":
    from argen.cli import main as argen_main

    sys.exit(argen_main(["tokenize", *sys.argv[1:]]))
