"""HTTP front end of the engine (standard library only: one thread per connection, the engine batches them).

Endpoints
  GET  /healthz                       liveness: {"status": "ok"}
  GET  /v1/info                       model, limits and default sampling parameters
  POST /v1/generate                   JSON in, JSON out (codes, or base64 PNGs with a VQ decoder)
  GET  /v1/image?class_label=207&...  one image as image/png (query parameters as in /v1/generate)

Request fields (POST body or query): class_labels | class_label (c2i), prompts | prompt (t2i, needs a T5 encoder),
cfg_scale, cfg_schedule ("constant", "linear" or an int interval), temperature, top_k, top_p, seed, num_tokens,
format ("codes" | "png"), timeout_s. Bad input is a 400 naming the field; a full server is a 503 with Retry-After;
a request past its deadline is a 504 and its slots are freed.
"""
from __future__ import annotations

import base64
import difflib
import io
import json
import logging
import math
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

import torch

from argen.errors import ArgenError
from argen.model.pixels import to_uint8
from argen.serve.engine import Engine, EngineBusy, Request

log = logging.getLogger(__name__)

FIELDS = ("class_labels", "class_label", "prompts", "prompt", "cfg_scale", "cfg_schedule", "temperature", "top_k",
          "top_p", "seed", "num_tokens", "format", "timeout_s")
MAX_BODY = 1 << 20
MAX_CFG = 100.0
MAX_TEMPERATURE = 100.0


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def bad(message: str) -> HTTPError:
    return HTTPError(HTTPStatus.BAD_REQUEST, message)


@dataclass
class Defaults:
    """Sampling defaults when a request leaves a field out: the reference demo settings (LlamaGen `sample_c2i.py`)."""
    cfg_scale: float
    top_k: int
    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def for_model(cls, model_type: str, vocab_size: int = 16384) -> "Defaults":
        if model_type == "c2i":
            return cls(cfg_scale=4.0, top_k=min(2000, vocab_size))
        return cls(cfg_scale=7.5, top_k=min(1000, vocab_size))


TextEncoder = Callable[[list[str]], "tuple[torch.Tensor, torch.Tensor]"]


class ServeApp:
    """Validation, the concurrency limit, deadlines and output encoding; transport-free so tests can call it."""

    def __init__(self, engine: Engine, *, vq=None, text_encoder: TextEncoder | None = None,
                 max_concurrency: int = 64, timeout_s: float = 300.0, max_images: int | None = None,
                 defaults: Defaults | None = None):
        self.engine = engine
        self.cfg = engine.config
        self.vq = vq
        self.text_encoder = text_encoder
        self.timeout_s = float(timeout_s)
        self.max_images = max_images or engine.max_batch
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._vq_lock = threading.Lock()
        self.defaults = defaults or Defaults.for_model(self.cfg.model_type, self.cfg.vocab_size)
        if vq is not None and vq.codebook_size < self.cfg.vocab_size:
            raise ArgenError(f"VQ codebook ({vq.codebook_size}) is smaller than the GPT vocabulary "
                             f"({self.cfg.vocab_size}): not the tokenizer this model was trained on")

    # ---- info --------------------------------------------------------------------------------------------------
    def info(self) -> dict:
        c = self.cfg
        return {"model": c.name, "model_type": c.model_type, "num_classes": c.num_classes if c.model_type == "c2i"
                else None, "tokens": c.block_size, "grid": [c.grid, c.grid], "vocab_size": c.vocab_size,
                "max_images_per_request": self.max_images, "max_batch": self.engine.max_batch,
                "max_concurrency": self.max_concurrency, "timeout_s": self.timeout_s,
                "png": self.vq is not None, "prompts": self.text_encoder is not None,
                "defaults": vars(self.defaults)}

    # ---- parsing -----------------------------------------------------------------------------------------------
    @staticmethod
    def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
        v = body.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"'{name}' must be a number, got {json.dumps(v)}")
        if integer and (not float(v).is_integer()):
            raise bad(f"'{name}' must be an integer, got {v}")
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise bad(f"'{name}' = {v} is out of range {'(' if lo_open else '['}{lo}, {hi}]")
        return int(v) if integer else float(v)

    def parse(self, body: Any) -> tuple[Request, str, float, int]:
        """JSON body -> (engine request, output format, timeout seconds, image count)."""
        if not isinstance(body, dict):
            raise bad("request body must be a JSON object")
        unknown = [k for k in body if k not in FIELDS]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, FIELDS, n=1)
            raise bad(f"unknown field '{k}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                      + f"; fields: {', '.join(FIELDS)}")
        c, d = self.cfg, self.defaults
        cond, mask = self._condition(body)
        n = cond.shape[0]
        cfg_scale = self._number(body, "cfg_scale", d.cfg_scale, 0.0, MAX_CFG)
        temperature = self._number(body, "temperature", d.temperature, 0.0, MAX_TEMPERATURE, lo_open=True)
        top_k = self._number(body, "top_k", d.top_k, 0, c.vocab_size, integer=True)
        top_p = self._number(body, "top_p", d.top_p, 0.0, 1.0, lo_open=True)
        seed = self._number(body, "seed", None, 0, 2**63 - 1, integer=True)
        num_tokens = self._number(body, "num_tokens", None, 1, c.block_size, integer=True)
        schedule = body.get("cfg_schedule")
        if schedule is not None and not (schedule in ("constant", "linear")
                                         or (isinstance(schedule, int) and not isinstance(schedule, bool))):
            raise bad(f"'cfg_schedule' must be \"constant\", \"linear\" or an integer interval, got {json.dumps(schedule)}")
        fmt = body.get("format", "codes")
        if fmt not in ("codes", "png"):
            raise bad(f"'format' must be \"codes\" or \"png\", got {json.dumps(fmt)}")
        if fmt == "png" and self.vq is None:
            raise bad("format \"png\" needs a VQ decoder: start the server with --vq VQ_DIR (or ask for \"codes\")")
        if fmt == "png" and num_tokens is not None and num_tokens != c.block_size:
            raise bad("format \"png\" needs the full image: leave 'num_tokens' out")
        timeout = self._number(body, "timeout_s", self.timeout_s, 0.0, self.timeout_s, lo_open=True)
        req = Request(cond, cond_mask=mask, cfg_scale=cfg_scale, cfg_schedule=schedule, temperature=temperature,
                      top_k=top_k, top_p=top_p, seed=seed, num_tokens=num_tokens)
        return req, fmt, timeout, n

    def _condition(self, body: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.cfg
        labels = body.get("class_labels", body.get("class_label"))
        prompts = body.get("prompts", body.get("prompt"))
        if ("class_labels" in body) + ("class_label" in body) + ("prompts" in body) + ("prompt" in body) > 1:
            raise bad("give exactly one of 'class_labels', 'class_label', 'prompts', 'prompt'")
        if c.model_type == "c2i":
            if prompts is not None:
                raise bad("this is a class-conditional model: send 'class_labels', not prompts")
            if labels is None:
                raise bad(f"missing 'class_labels' (a list of class ids in 0..{c.num_classes - 1})")
            if not isinstance(labels, list):
                labels = [labels]
            if not labels:
                raise bad("'class_labels' is empty")
            self._check_count(len(labels))
            for v in labels:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise bad(f"class labels must be integers, got {json.dumps(v)}")
                if not 0 <= v < c.num_classes:
                    raise bad(f"unknown class {v}: the model has classes 0..{c.num_classes - 1}")
            return torch.tensor(labels, dtype=torch.long), None
        if labels is not None:
            raise bad("this is a text-conditional model: send 'prompts', not class labels")
        if prompts is None:
            raise bad("missing 'prompts' (a list of non-empty strings)")
        if not isinstance(prompts, list):
            prompts = [prompts]
        if not prompts:
            raise bad("'prompts' is empty")
        self._check_count(len(prompts))
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise bad(f"prompt {i} must be a string, got {json.dumps(p)}")
            if not p.strip():
                raise bad(f"prompt {i} is empty")
        if self.text_encoder is None:
            raise bad("this server has no text encoder for prompts: start it with --t5 PATH "
                      "(a local transformers T5EncoderModel directory)")
        feats, mask = self.text_encoder(prompts)
        return feats, mask

    def _check_count(self, n: int) -> None:
        if n > self.max_images:
            raise bad(f"{n} images requested; this server takes at most {self.max_images} per request")

    # ---- running -----------------------------------------------------------------------------------------------
    def generate(self, body: Any) -> dict:
        """Validate, run under the concurrency limit and the deadline, and encode. Raises HTTPError."""
        if not self._slots.acquire(blocking=False):
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"server busy: {self.max_concurrency} requests in flight; retry later",
                            {"Retry-After": "1"})
        try:
            req, fmt, timeout, n = self.parse(body)
            t0 = time.monotonic()
            try:
                fut = self.engine.submit(req)
            except EngineBusy as e:
                raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, str(e)) from None
            except ArgenError as e:
                raise HTTPError(HTTPStatus.BAD_REQUEST, str(e)) from None
            try:
                res = fut.result(timeout=timeout)
            except FutureTimeout:
                fut.cancel()  # the engine frees the request's slots at its next step
                raise HTTPError(HTTPStatus.GATEWAY_TIMEOUT, f"generation did not finish within {timeout:g} s") from None
            except ArgenError as e:  # the engine stopped under this request
                raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, str(e)) from None
            out: dict[str, Any] = {"seed": res.seed, "grid": [self.cfg.grid, self.cfg.grid],
                                   "timing": {"queued_s": round(res.queued_s, 4), "run_s": round(res.run_s, 4),
                                              "total_s": round(time.monotonic() - t0, 4)}}
            if fmt == "png":
                out["images"] = [base64.b64encode(p).decode("ascii") for p in self.png(res.codes)]
            else:
                out["codes"] = res.codes.tolist()
            return out
        finally:
            self._slots.release()

    def png(self, codes: torch.Tensor) -> list[bytes]:
        from PIL import Image
        with self._vq_lock, torch.inference_mode():  # one decode at a time: it is large and already parallel
            p = next(self.vq.parameters())
            img = self.vq.decode(codes.to(p.device))
            pix = to_uint8(img).permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for a in pix:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out


def _query_body(query: str) -> dict:
    """?class_label=3&seed=1 -> {"class_label": 3, "seed": 1}: numbers parsed, lists comma-separated."""
    body: dict[str, Any] = {}
    for k, vs in parse_qs(query, keep_blank_values=True).items():
        v = vs[-1]
        # text fields stay text ("2024" is a prompt); a cfg_schedule of digits is an interval
        if k in ("prompt", "prompts", "format") or (k == "cfg_schedule" and not v.lstrip("-").isdigit()):
            body[k] = v
            continue
        parts = v.split(",") if k in ("class_labels",) else [v]
        vals = []
        for part in parts:
            try:
                vals.append(json.loads(part))
            except json.JSONDecodeError:
                raise bad(f"query parameter '{k}' must be a number, got '{part}'") from None
        body[k] = vals if k == "class_labels" else vals[0]
    return body


class Handler(BaseHTTPRequestHandler):
    app: ServeApp
    server_version = "argen-serve"
    timeout = 30  # seconds a client may take to send its request

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _error(self, e: HTTPError) -> None:
        self._json(e.status, {"error": e.message, "status": int(e.status)}, e.headers)

    def do_GET(self):
        url = urlparse(self.path)
        try:
            if url.path == "/healthz":
                return self._json(200, {"status": "ok"})
            if url.path == "/v1/info":
                return self._json(200, self.app.info())
            if url.path == "/v1/image":
                body = _query_body(url.query)
                if self.app.vq is None:
                    raise bad("/v1/image needs a VQ decoder: start the server with --vq VQ_DIR")
                body["format"] = "png"
                if any(isinstance(v, list) and len(v) != 1 for v in body.values()):
                    raise bad("/v1/image returns one image: give one class_label or prompt (use POST /v1/generate "
                              "for several)")
                out = self.app.generate(body)
                return self._send(200, base64.b64decode(out["images"][0]), "image/png",
                                  {"X-Seed": str(out["seed"])})
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {url.path}")
        except HTTPError as e:
            self._error(e)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the connection thread silently
            log.exception("GET %s failed", self.path)
            self._error(HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}: {e}"))

    def do_POST(self):
        url = urlparse(self.path)
        try:
            if url.path != "/v1/generate":
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {url.path}")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header required") from None
            if length > MAX_BODY:
                raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds {MAX_BODY}")
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise bad(f"body is not valid JSON: {e}") from None
            self._json(200, self.app.generate(body))
        except HTTPError as e:
            self._error(e)
        except Exception as e:  # noqa: BLE001
            log.exception("POST %s failed", self.path)
            self._error(HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}: {e}"))


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def make_server(app: ServeApp, host: str = "127.0.0.1", port: int = 0) -> Server:
    """A bound, not yet serving, HTTP server; port 0 picks a free port (see server.server_address)."""
    handler = type("BoundHandler", (Handler,), {"app": app})
    return Server((host, port), handler)
