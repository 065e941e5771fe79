"""`argen serve CKPT --port P [--vq VQ_DIR] [--t5 T5_DIR]`: the HTTP sampling server over the engine."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import torch

from argen import device as dev
from argen.errors import ArgenError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="argen serve", description="Serve a GPT checkpoint over HTTP: POST /v1/generate (codes or PNG), "
        "GET /v1/image (one PNG), GET /v1/info, GET /healthz. See the README, 'Fast sampling and serving'.")
    ap.add_argument("ckpt", help="GPT model directory (config.json + model.safetensors)")
    ap.add_argument("--port", type=int, default=8000, help="TCP port (0 = pick a free one and print it)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to accept remote clients)")
    ap.add_argument("--vq", metavar="VQ_DIR", help="VQ tokenizer directory: enables PNG output")
    ap.add_argument("--t5", metavar="T5_DIR", help="local transformers T5EncoderModel directory: enables prompts (t2i)")
    ap.add_argument("--max-batch", type=int, default=16, help="images decoded together (KV cache slots)")
    ap.add_argument("--max-concurrency", type=int, default=64, help="requests in flight before 503 busy")
    ap.add_argument("--max-images", type=int, default=None, help="images per request (default: --max-batch)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take before 504")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="GPT weights and KV cache (auto: bf16 on an accelerator, fp32 on CPU)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="compile the decode step (auto: with CUDA graphs on an accelerator, eager on CPU; on a CPU "
                         "'on' halves the decode step of a long-running server for a 15-40 s warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--log-level", default="INFO")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, v in (("--port", args.port), ("--max-batch", args.max_batch), ("--max-concurrency", args.max_concurrency)):
        if v < (0 if name == "--port" else 1) or (name == "--port" and v > 65535):
            raise ArgenError(f"{name} {v} is out of range")
    if args.timeout <= 0:
        raise ArgenError(f"--timeout must be > 0, got {args.timeout}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from argen.model import load
    from argen.model.io import read_record
    from argen.serve.engine import Engine
    from argen.serve.server import ServeApp, make_server

    device = dev.default_device()
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if dev.is_accelerator(device) else torch.float32)
    if read_record(args.ckpt).get("kind") != "gpt":
        raise ArgenError(f"{args.ckpt} is not a GPT checkpoint (kind '{read_record(args.ckpt).get('kind')}')")
    model = load(args.ckpt, device=device, dtype=dtype)
    cfg = model.config
    vq = None
    if args.vq:
        if read_record(args.vq).get("kind") != "vq":
            raise ArgenError(f"--vq {args.vq} is not a VQ tokenizer directory")
        vq = load(args.vq, device=device)
    text_encoder = None
    if args.t5:
        if cfg.model_type != "t2i":
            raise ArgenError(f"--t5 given but {args.ckpt} is a class-conditional (c2i) model")
        from argen.serve.text import PromptEncoder
        text_encoder = PromptEncoder(args.t5, cfg.cls_token_num, cfg.caption_dim, device=device,
                                     dtype=torch.bfloat16 if dev.is_accelerator(device) else torch.float32)
    elif cfg.model_type == "t2i":
        logging.getLogger("argen.serve").warning(
            "t2i model served without --t5: prompt requests will be refused (400) until a T5 directory is given")

    engine = Engine(model, max_batch=args.max_batch, compile={"auto": "auto", "on": True, "off": False}[args.compile])
    if engine.compiled:
        print("argen serve: compiling the decode step ...", flush=True)
        print(f"argen serve: warm-up took {engine.warmup():.1f} s", flush=True)
    app = ServeApp(engine, vq=vq, text_encoder=text_encoder, max_concurrency=args.max_concurrency,
                   timeout_s=args.timeout, max_images=args.max_images)
    try:
        server = make_server(app, args.host, args.port)
    except OSError as e:
        raise ArgenError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    print(f"argen serve: {Path(args.ckpt).name} ({cfg.name}, {cfg.model_type}, {cfg.block_size} tokens) on "
          f"http://{host}:{port}  [device {device}, {str(dtype).replace('torch.', '')}, max batch {args.max_batch}, "
          f"png {'on' if vq else 'off'}, prompts {'on' if text_encoder else 'off'}]", flush=True)

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    print("argen serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
