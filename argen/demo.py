"""`argen demo`: the whole pipeline on the embedded defaults — synthetic images, local files, one process.

1. train a tiny VQ tokenizer on the synthetic images          (argen train configs/vq-tiny.yaml)
2. tokenize the synthetic set into local code shards          (argen tokenize configs/tokenize-synthetic.yaml)
3. train a tiny class-conditional GPT from those shards      (argen train configs/gpt-tiny.yaml)
4. sample a PNG grid, one row per class                       (argen sample)
5. evaluate: sample a batch to .npz and score it against real synthetic images (argen eval sample / score)

Each step is the real command run as a subprocess; the demo prints it so you can rerun any step by hand. Steps whose
output already exists are skipped, so an interrupted demo continues where it stopped (--fresh starts over).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from argen.errors import ArgenError

REPO = Path(__file__).resolve().parents[1]


def _latest_export(run_dir: Path) -> Path | None:
    from argen.eval.records import Store, list_exports
    done = [e for e in list_exports(Store(str(run_dir))) if not e.variant]  # not the -ema copies
    return Path(done[-1].path) if done else None


def _run(step: str, args: list[str], env: dict) -> None:
    cmd = [sys.executable, "-m", "argen.cli", *args]
    print(f"\n=== {step}\n$ argen {shlex.join(args)}", flush=True)
    t = time.time()
    rc = subprocess.call(cmd, env=env, cwd=REPO)
    if rc != 0:
        raise ArgenError(f"demo step '{step}' failed with exit status {rc}")
    print(f"--- {step}: {time.time() - t:.0f} s", flush=True)


def _reference_images(path: Path, n: int, size: int) -> None:
    """Real images of the synthetic set (fresh indices, not the training ones) as an eval reference batch."""
    import numpy as np

    from argen.data_pipeline.synthetic import synthetic_image
    from argen.eval.npz import save_images
    imgs = np.stack([np.asarray(synthetic_image(100_000 + i, size=size)) for i in range(n)])
    save_images(path, imgs)


def _inception_weights(out: Path) -> tuple[str, bool]:
    """The real FID Inception if the user placed it; else random-init weights (the numbers then only prove the path)."""
    from argen.eval.inception import InceptionV3, default_weights_path, save_inception
    real = default_weights_path()  # $ARGEN_INCEPTION_WEIGHTS, else the cache path
    if real.is_file():
        return str(real), True
    path = out / "random-inception.safetensors"
    if not path.is_file():
        import torch
        torch.manual_seed(0)
        net = InceptionV3(width=0.25, input_size=75)  # scaled-down copy: quick on a CPU
        for m in net.modules():  # variance-preserving init, so random features do not fade to zero with depth
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        save_inception(net, path)
    return str(path), False


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="argen demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", help="working directory for every artefact (default demo-out/)")
    p.add_argument("--quick", action="store_true", help="fewer steps and images (a smoke run, blurrier results)")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of continuing")
    p.add_argument("--eval-images", type=int, default=200, help="images sampled and scored in step 5")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), PYTHONUNBUFFERED="1")
    vq_steps, gpt_steps, n_images = (120, 150, 400) if args.quick else (500, 2000, 2000)
    n_eval = 50 if args.quick else args.eval_images
    t0 = time.time()

    vq_run = out / "vq"
    vq = _latest_export(vq_run)
    if vq is None:
        _run("1/5 train the VQ tokenizer", ["train", "configs/vq-tiny.yaml", f"run_dir={vq_run}",
                                            f"train.max_steps={vq_steps}", f"data.synthetic_count={n_images}"], env)
        vq = _latest_export(vq_run)
        if vq is None:
            raise ArgenError(f"the VQ run left no export under {vq_run}/exports")
    else:
        print(f"\n=== 1/5 VQ tokenizer: using {vq}")
    print(f"    reconstructions before/after training: {vq_run}/grids/")

    codes = out / "codes"
    if not (codes / "manifest.json").is_file():
        _run("2/5 tokenize the synthetic images into code shards",
             ["tokenize", "configs/tokenize-synthetic.yaml", f"vq.path={vq}", f"output.url={codes}",
              f"source.num_images={n_images}", "--no-progress"], env)
    else:
        print(f"\n=== 2/5 code shards: using {codes}")

    from argen.data_pipeline.shard_format import read_manifest
    shards = read_manifest(str(codes))
    image_size = shards.image_size
    grid_args = [f"model.image_size={image_size}", f"model.downsample={image_size // shards.grid}",
                 f"model.vocab_size={shards.codebook_size}", "model.num_classes=10"]
    gpt_run = out / "gpt"
    gpt = _latest_export(gpt_run)
    if gpt is None:
        _run("3/5 train the GPT from the shards", ["train", "configs/gpt-tiny.yaml", f"run_dir={gpt_run}",
                                                   f"data.url={codes}", f"train.max_steps={gpt_steps}", "train.global_batch=32",
                                                   "train.checkpoint_every=1000", *grid_args], env)
        gpt = _latest_export(gpt_run)
        if gpt is None:
            raise ArgenError(f"the GPT run left no export under {gpt_run}/exports")
    else:
        print(f"\n=== 3/5 GPT: using {gpt}")

    grid_png = out / "samples.png"
    _run("4/5 sample one image per class", ["sample", str(gpt), "--labels", ",".join(str(i % 10) for i in range(20)),
                                            "--cfg-scale", "2.0", "--top-k", "0", "--seed", "0", "--vq", str(vq),
                                            "--out", str(grid_png)], env)

    ev = out / "eval"
    ev.mkdir(exist_ok=True)
    ref = ev / "reference.npz"
    if not ref.is_file():
        _reference_images(ref, n_eval, image_size)
    weights, real = _inception_weights(ev)
    _run("5/5 evaluate", ["eval", "sample", str(gpt), "--vq", str(vq), "--out", str(ev / "samples.npz"),
                          "--num", str(n_eval), "--batch-size", "25", "--cfg-scale", "2.0", "--top-k", "0",
                          "--image-size-eval", "0", "--resize", "none"], env)
    _run("5/5 score", ["eval", "score", str(ev / "samples.npz"), str(ref), "--inception", weights,
                       "--out", str(ev / "metrics.json")], env)
    if not real:
        print("    NOTE: scored with a RANDOM-INIT Inception (no weights at $ARGEN_INCEPTION_WEIGHTS or the default "
              "path), so these numbers only prove the pipeline runs; see README 'Evaluation' for the real weights.")
    print(f"\ndemo finished in {time.time() - t0:.0f} s. Look at:\n  {grid_png}\n  {vq_run}/grids/\n"
          f"  {ev / 'metrics.json'}\n  {gpt_run}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
