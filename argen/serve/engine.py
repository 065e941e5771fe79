"""The sampling engine: a static KV cache, CFG rows bound by construction, continuous batching, a compiled decode step.

Layout. The cache holds `max_batch` *slots*; a slot is one image being generated and owns the two adjacent cache
rows 2s (conditional) and 2s+1 (unconditional). The uncond row of an image is therefore always its own, whatever
order requests arrive or finish in: CFG reads a (slots, 2, ...) view of the batch, never "the second half of the batch"
(the reference's vLLM fork pairs rows by request order, LlamaGen `autoregressive/serve/`).

Loop (one worker thread owns the model and the cache):
  1. admit queued requests into free slots (a request of n images takes n slots; FIFO, no overtaking);
  2. prefill the newly admitted slots (their prefix only, eager, written into their cache rows) and sample token 0;
  3. one decode step for every live slot (compiled by default on an accelerator): feed each slot's last token at its own position, attend over
     its own cache rows; then per group of requests with the same sampling parameters one CFG, one head call and
     one filter, and a draw with each request's generator (argen.model.sampling);
  4. hand finished requests their codes and free their slots.
New requests therefore join between decode steps and never wait for a running batch to drain.

Exactness: each request draws its uniforms from its own `torch.Generator` seeded like generate's and goes through
the same RoPE and sampling functions, so a request returns the codes `argen.generate(model, cond, seed=...)` returns
when the decode step runs eagerly (tested in fp32 for every parameter combination). The step's own attention and a
compiled step round differently from generate's kernels, so in bf16 a near-tie between two candidates can go the
other way. Requests without a seed draw from one engine generator.
"""
from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from argen import device as dev
from argen.errors import ArgenError
from argen.model.attention import attention
from argen.model.generate import CfgSchedule, cfg_scale_at, uses_cfg
from argen.model.gpt import apply_rope
from argen.model import sampling

log = logging.getLogger(__name__)


class EngineBusy(ArgenError):
    """The engine cannot take a request now (queue full, or closed): a server answers 503, not 400."""


@dataclass
class Request:
    """One generation call: n conditions sharing sampling parameters and one seed (like one `argen.generate` call).

    cond: c2i class labels (a list of ints or a (n,) long tensor); t2i caption features (n, T, caption_dim) with an
    optional bool mask (n, T). Defaults equal `argen.generate`'s, so Request(cond, seed=s) == generate(model, cond,
    seed=s)."""
    cond: Any
    cond_mask: torch.Tensor | None = None
    cfg_scale: float = 1.0
    cfg_schedule: CfgSchedule = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    greedy: bool = False
    num_tokens: int | None = None


@dataclass
class Result:
    codes: torch.Tensor  # (n, N) long, on the CPU
    seed: int | None
    queued_s: float  # from submit to admission
    run_s: float  # from admission to the last token
    first_step: int = 0  # engine decode-step counter at admission and at the last token: requests whose
    last_step: int = 0  # [first, last] ranges overlap were decoded in the same batches


@dataclass
class _Job:
    req: Request
    future: Future
    n: int
    n_tokens: int
    cond: torch.Tensor
    cond_mask: torch.Tensor | None
    use_cfg: bool
    generator: torch.Generator | None
    submitted: float
    started: float = 0.0
    slots: list[int] = field(default_factory=list)
    slot_index: torch.Tensor | None = None
    first_step: int = 0
    step: int = 0  # tokens sampled so far (the same for all of a request's slots)


class _Decoder(torch.nn.Module):
    """The model's weights plus the static cache, as one module so a compiler sees the cache as fixed buffers."""

    def __init__(self, model, slots: int, max_seq: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        cfg = model.config
        self.model = model
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        shape = (2 * slots, cfg.n_head, max_seq, cfg.head_dim)
        for i in range(cfg.n_layer):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("positions", torch.arange(max_seq, device=device), persistent=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.explicit_attention = not dev.is_accelerator(device)

    def caches(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def prefill(self, x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Prefix embeddings x (r, T, dim) for cache rows `rows` (r,) -> last position's normed hidden (r, dim)
        (the head runs in Engine._sample, which decides per request how many rows need it)."""
        m = self.model
        B, S, _ = x.shape
        rope = m.rope[:S]
        for i, layer in enumerate(m.layers):
            att = layer.attention
            a = layer.attention_norm(x)
            q, k, v = att.wqkv(a).view(B, S, 3, self.n_head, self.head_dim).unbind(2)
            q, k = apply_rope(q, rope), apply_rope(k, rope)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            kc, vc = self.caches(i)
            kc[:, :, :S].index_copy_(0, rows, k)
            vc[:, :, :S].index_copy_(0, rows, v)
            y = attention(q, k, v, mask=mask, is_causal=mask is None and S > 1)
            h = x + att.wo(y.transpose(1, 2).reshape(B, S, -1))
            x = h + layer.feed_forward(layer.ffn_norm(h))
        return m.norm(x[:, -1])

    def _decode_attention(self, q, k, v, mask):
        if self.explicit_attention:
            # One query per row: two batched GEMVs beat the CPU flash kernel, whose per-call blocking set-up costs
            # more than the arithmetic here (about 10x at head_dim 32-64 and a few hundred keys).
            s = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            s = s.masked_fill(~mask, float("-inf"))
            return torch.matmul(s.softmax(-1), v)
        return attention(q, k, v, mask=mask)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor | None,
                length: int) -> torch.Tensor:
        """One token per row for cache rows 0..r-1: tokens (r,), positions (r,), optional caption key mask
        (r, >= length) -> normed hidden (r, dim). Attends over cache columns [0, length) of each row, masked to <= pos."""
        m = self.model
        r = tokens.shape[0]
        x = m.tok_embeddings(tokens)[:, None]  # (r, 1, dim)
        rope = m.rope[pos][:, None]  # (r, 1, D/2, 2)
        visible = self.positions[:length][None] <= pos[:, None]
        if key_mask is not None:
            visible = visible & key_mask[:, :length]
        mask = visible[:, None, None]  # (r, 1, 1, L)
        rows = torch.arange(r, device=tokens.device)
        for i, layer in enumerate(m.layers):
            att = layer.attention
            a = layer.attention_norm(x)
            q, k, v = att.wqkv(a).view(r, 1, 3, self.n_head, self.head_dim).unbind(2)
            q, k = apply_rope(q, rope), apply_rope(k, rope)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            kc, vc = self.caches(i)
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            y = self._decode_attention(q, kc[:r, :, :length], vc[:r, :, :length], mask)
            h = x + att.wo(y.transpose(1, 2).reshape(r, 1, -1))
            x = h + layer.feed_forward(layer.ffn_norm(h))
        return m.norm(x[:, -1])


class Engine:
    """Continuous-batching sampler over one GPT.

    >>> engine = Engine(model, max_batch=16)
    >>> codes = engine.generate([Request([207, 360], cfg_scale=4.0, top_k=2000, seed=0)])[0]
    >>> fut = engine.submit(Request([1], seed=1)); fut.result().codes

    max_batch: images decoded together (each uses a cond and an uncond cache row).
    compile: True, False or "auto" (compile the decode step; on an accelerator with CUDA graphs). If compilation
    fails the engine logs why and runs eagerly.
    length_bucket: decode attends over the cache up to the longest live position rounded up to this many columns
    and over the slots up to the highest live one (the CPU default, 16); 0 = static shapes: every step runs all
    slots over the whole cache, one shape for one CUDA graph (the default on accelerators, where a graph replay
    costs less than the work skipped).
    The engine owns the model while it runs: do not train or call argen.generate on it from another thread.
    """

    def __init__(self, model, *, max_batch: int = 16, compile: bool | str = "auto", length_bucket: int | None = None,
                 max_queue: int = 1024, seed: int | None = None):
        if max_batch < 1:
            raise ArgenError(f"max_batch must be >= 1, got {max_batch}")
        if getattr(model, "kind", None) != "gpt":
            raise ArgenError("Engine needs an argen GPT model (argen.model.load(DIR) of a 'gpt' checkpoint)")
        self.model = model.eval()
        self.config = model.config
        self.device = model.output.weight.device
        self.dtype = model.output.weight.dtype
        self.max_batch = max_batch
        self.T = self.config.cls_token_num
        self.N = self.config.block_size
        self.max_seq = self.T + self.N - 1
        accel = dev.is_accelerator(self.device)
        self.length_bucket = (0 if accel else 16) if length_bucket is None else int(length_bucket)
        self._decoder = _Decoder(model, max_batch, self.max_seq, self.dtype, self.device)
        self._compile_mode = None
        if compile is True or (compile == "auto" and accel):
            # On CPU "auto" stays eager: Inductor made GPT-small's bf16 engine 1.49x faster (serve_speed.py
            # --compile off / on) but compiles for ~16 s first, which tests and short-lived engines would pay.
            self._compile_mode = "reduce-overhead" if accel else "default"
        # torch.compile only wraps: compilation happens at the first decode step (or in warmup())
        self._step_fn: Callable = (torch.compile(self._decoder, mode=self._compile_mode,
                                                 dynamic=bool(self.length_bucket))
                                   if self._compile_mode else self._decoder)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._pending: list[_Job] = []
        self._slots: list[_Job | None] = [None] * max_batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._shared_gen = torch.Generator(device=self.device)
        # from the OS, not torch's global generator: creating an engine must not shift the caller's random stream
        self._shared_gen.manual_seed(secrets.randbits(62) if seed is None else seed)
        self.stats = {"steps": 0, "prefills": 0, "images": 0, "requests": 0}
        self._init_slot_state()

    # ---- public API --------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Future:
        """Queue a request; the future resolves to a Result (or raises ArgenError for bad input)."""
        job = self._make_job(request)
        if self._stop.is_set():
            raise EngineBusy("engine is closed")
        self._ensure_thread()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise EngineBusy(f"engine queue is full ({self._queue.maxsize} requests waiting)") from None
        return job.future

    def generate(self, requests: Request | Sequence[Request], timeout: float | None = None) -> list[torch.Tensor]:
        """Run requests together and return their codes (n_i, N) in request order."""
        single = isinstance(requests, Request)
        futs = [self.submit(r) for r in ([requests] if single else requests)]
        return [f.result(timeout=timeout).codes for f in futs]

    def close(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def warmup(self, timeout: float | None = None) -> float:
        """Run a three-token request (two decode steps: CUDA-graph trees record a function on its second call) so
        compilation and graph capture happen now, not in a user's request. Returns the seconds it took."""
        t = time.monotonic()
        c = self.config
        cond = [0] if c.model_type == "c2i" else torch.zeros(1, c.cls_token_num, c.caption_dim)
        self.generate(Request(cond, cfg_scale=2.0, top_k=1, seed=0, num_tokens=min(3, self.N)), timeout=timeout)
        return time.monotonic() - t

    @property
    def compiled(self) -> bool:
        """Whether decode steps go through torch.compile (False after a compile failure fell back to eager)."""
        return self._step_fn is not self._decoder

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self._slots)

    # ---- validation --------------------------------------------------------------------------------------------
    def _make_job(self, r: Request) -> _Job:
        cfg = self.config
        if not math.isfinite(r.cfg_scale) or r.cfg_scale < 0:
            raise ArgenError(f"cfg_scale must be a finite number >= 0, got {r.cfg_scale}")
        if not math.isfinite(r.temperature) or r.temperature < 0:
            raise ArgenError(f"temperature must be a finite number >= 0, got {r.temperature}")
        if isinstance(r.top_k, bool) or int(r.top_k) != r.top_k or r.top_k < 0:
            raise ArgenError(f"top_k must be an integer >= 0 (0 = off), got {r.top_k}")
        if not (0.0 < r.top_p <= 1.0):
            raise ArgenError(f"top_p must be in (0, 1], got {r.top_p}")
        if r.seed is not None and (isinstance(r.seed, bool) or int(r.seed) != r.seed or r.seed < 0):
            raise ArgenError(f"seed must be a non-negative integer, got {r.seed}")
        n_tokens = self.N if r.num_tokens is None else int(r.num_tokens)
        if not 1 <= n_tokens <= self.N:
            raise ArgenError(f"num_tokens must be in [1, {self.N}], got {r.num_tokens}")
        if r.cfg_schedule is not None:
            cfg_scale_at(0, n_tokens, r.cfg_scale, r.cfg_schedule)  # raises for unknown schedules
        cond_mask = None
        if cfg.model_type == "c2i":
            cond = torch.as_tensor(r.cond)
            if cond.ndim == 0:
                cond = cond[None]
            if cond.numel() == 0:
                raise ArgenError("request has no conditions (empty class label list)")
            if cond.ndim != 1 or cond.dtype not in (torch.int32, torch.int64):
                raise ArgenError(f"c2i requests take class labels (ints), got {tuple(cond.shape)} {cond.dtype}")
            bad = [int(c) for c in cond.tolist() if not 0 <= int(c) < cfg.num_classes]
            if bad:
                raise ArgenError(f"unknown class label(s) {bad}: the model has classes 0..{cfg.num_classes - 1}")
            cond = cond.long()
        else:
            cond = torch.as_tensor(r.cond)
            if cond.ndim == 2:
                cond = cond[None]
            if cond.ndim != 3 or tuple(cond.shape[1:]) != (cfg.cls_token_num, cfg.caption_dim):
                raise ArgenError(f"t2i requests take caption features (n, {cfg.cls_token_num}, {cfg.caption_dim}), "
                                 f"got {tuple(cond.shape)}")
            if not cond.is_floating_point():
                raise ArgenError(f"caption features must be floating point, got {cond.dtype}")
            if r.cond_mask is not None:
                cond_mask = torch.as_tensor(r.cond_mask)
                if cond_mask.ndim == 1:
                    cond_mask = cond_mask[None]
                if tuple(cond_mask.shape) != tuple(cond.shape[:2]):
                    raise ArgenError(f"caption mask must have shape {tuple(cond.shape[:2])}, "
                                     f"got {tuple(cond_mask.shape)}")
                cond_mask = cond_mask.bool()
        n = cond.shape[0]
        if n == 0:
            raise ArgenError("request has no conditions (empty label list / no prompts)")
        if n > self.max_batch:
            raise ArgenError(f"request has {n} images but the engine's max_batch is {self.max_batch}")
        use_cfg = uses_cfg(r.cfg_scale, r.cfg_schedule)
        gen = None
        if r.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(r.seed))
        return _Job(req=r, future=Future(), n=n, n_tokens=n_tokens, cond=cond, cond_mask=cond_mask,
                    use_cfg=use_cfg, generator=gen, submitted=time.monotonic())

    # ---- the worker --------------------------------------------------------------------------------------------
    def _init_slot_state(self) -> None:
        M, d = self.max_batch, self.device
        self._tok = torch.zeros(M, dtype=torch.long, device=d)  # last sampled token per slot
        self._pos = torch.full((M,), self.T, dtype=torch.long, device=d)  # where that token is fed
        self._out = torch.zeros(M, self.N, dtype=torch.long, device=d)
        self._key_mask = None
        if self.config.model_type == "t2i":
            self._key_mask = torch.ones(2 * M, self.max_seq, dtype=torch.bool, device=d)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="argen-serve-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            # no_grad, not inference_mode: returned codes must be ordinary tensors a caller may train on
            with torch.no_grad():
                while not self._stop.is_set():
                    live = self.busy_slots > 0
                    self._drain_queue(block=not live and not self._pending)
                    new = self._admit()
                    if new:
                        self._prefill(new)
                    if self.busy_slots:
                        self._decode()
        except BaseException as e:  # noqa: BLE001 - a crashed worker must fail every waiter, not hang them
            log.exception("engine worker crashed")
            self._fail_all(e)
            self._stop.set()
        else:
            self._fail_all(ArgenError("engine closed"))

    def _drain_queue(self, block: bool) -> None:
        try:
            job = self._queue.get(timeout=0.5) if block else self._queue.get_nowait()
            while True:
                if job is not None:
                    self._pending.append(job)
                job = self._queue.get_nowait()
        except queue.Empty:
            pass

    def _fail_all(self, exc: BaseException) -> None:
        jobs = {id(j): j for j in self._slots if j is not None}
        jobs.update({id(j): j for j in self._pending})
        while True:
            try:
                j = self._queue.get_nowait()
            except queue.Empty:
                break
            if j is not None:
                jobs[id(j)] = j
        for j in jobs.values():
            if not j.future.done():
                try:
                    j.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                except Exception:  # noqa: BLE001 - cancelled meanwhile
                    pass
        self._slots = [None] * self.max_batch
        self._pending = []

    def _free(self, job: _Job) -> None:
        for s in job.slots:
            self._slots[s] = None
        # a free slot below the highest live one is still computed each step: keep its writes inside the cache
        if job.slot_index is not None:
            self._pos[job.slot_index] = self.T

    def _admit(self) -> list[_Job]:
        # drop requests whose caller gave up (timeouts cancel the future)
        self._pending = [j for j in self._pending if not j.future.cancelled()]
        for j in {id(j): j for j in self._slots if j is not None}.values():
            if j.future.cancelled():
                self._free(j)
        new = []
        free = [i for i, s in enumerate(self._slots) if s is None]
        while self._pending and self._pending[0].n <= len(free):
            job = self._pending.pop(0)
            job.slots, free = free[: job.n], free[job.n:]
            for s in job.slots:
                self._slots[s] = job
            job.slot_index = torch.tensor(job.slots, dtype=torch.long, device=self.device)
            job.started = time.monotonic()
            job.first_step = self.stats["steps"]
            new.append(job)
        return new

    def _prefill(self, jobs: list[_Job]) -> None:
        m = self.model
        conds, masks, slots = [], [], []
        for j in jobs:
            conds.append(j.cond)
            if j.cond_mask is not None:
                masks.append(j.cond_mask)
            elif self._key_mask is not None:
                masks.append(torch.ones(j.n, self.T, dtype=torch.bool))
            slots += j.slots
        n = len(slots)
        cond = torch.cat(conds).to(self.device)
        if cond.is_floating_point():  # caption features arrive in fp32 (HTTP, T5 in another dtype)
            cond = cond.to(self.dtype)
        x_c = m.embed_condition(cond)
        x_u = m.embed_condition(m.null_condition(n, self.device).to(cond.dtype))
        dt = m.tok_embeddings.weight.dtype
        x = torch.stack([x_c, x_u], dim=1).flatten(0, 1).to(dt)  # rows (c0, u0, c1, u1, ...)
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        rows = torch.stack([2 * slot_t, 2 * slot_t + 1], dim=1).flatten()
        mask = None
        if self._key_mask is not None:
            cm = torch.cat(masks).to(self.device).bool()
            cm = torch.stack([cm, cm], dim=1).flatten(0, 1)  # the uncond row keeps its prompt's mask, as generate
            mask = m.prefix_mask(cm, self.T)
            self._key_mask[rows, : self.T] = cm
        hidden = self._decoder.prefill(x, rows, mask)
        self.stats["prefills"] += 1
        local, at = {}, 0
        for j in jobs:  # the prefill batch holds the new jobs' slots in admission order
            local[id(j)] = torch.arange(at, at + j.n, device=self.device)
            at += j.n
        self._sample(hidden.view(n, 2, -1), jobs, local)

    def _decode(self) -> None:
        live = [i for i, s in enumerate(self._slots) if s is not None]
        hi = live[-1] + 1 if self.length_bucket else self.max_batch  # free slots compute harmless garbage
        jobs = list({id(self._slots[i]): self._slots[i] for i in live}.values())
        if self.length_bucket:
            longest = self.T + max(j.step for j in jobs)  # highest position fed this step, plus one
            length = min(self.max_seq, -(-longest // self.length_bucket) * self.length_bucket)
        else:
            length = self.max_seq
        tok = self._tok[:hi].repeat_interleave(2)
        pos = self._pos[:hi].repeat_interleave(2)
        km = None if self._key_mask is None else self._key_mask[: 2 * hi]
        hidden = self._call_decoder(tok, pos, km, length)
        self.stats["steps"] += 1
        self._sample(hidden.view(hi, 2, -1), jobs, {id(j): j.slot_index for j in jobs})

    def _call_decoder(self, tok, pos, km, length):
        if not self.compiled:
            return self._decoder(tok, pos, km, length)
        try:
            if self._compile_mode == "reduce-overhead":
                # each step starts a new CUDA-graph generation: the previous step's outputs are consumed already
                torch.compiler.cudagraph_mark_step_begin()
            return self._step_fn(tok, pos, km, length)
        except Exception as e:  # noqa: BLE001 - an engine that runs eagerly beats one that does not run
            # Safe to redo the step eagerly: its cache writes are idempotent (same values, same positions).
            log.warning("compiled decode step failed (%s: %s); running eagerly from now on", type(e).__name__, e)
            self._step_fn = self._decoder
            return self._decoder(tok, pos, km, length)

    def _sample(self, pair_hidden: torch.Tensor, jobs: list[_Job], local_rows: dict[int, torch.Tensor]) -> None:
        """pair_hidden (m, 2, dim): normed last hidden states, cond then uncond, of the slots of `jobs`; local_rows
        maps a job to its rows in pair_hidden. Samples one token per slot with argen.generate's arithmetic.

        Jobs with the same sampling parameters at this step share one head call and one filter; each seeded job
        then draws its uniforms from its own generator (the stream generate draws), unseeded jobs from the
        engine's."""
        groups: dict[tuple, list[_Job]] = {}
        for j in jobs:
            r = j.req
            scale = cfg_scale_at(j.step, j.n_tokens, r.cfg_scale, r.cfg_schedule) if j.use_cfg else None
            key = (scale, r.greedy) + (() if r.greedy else (r.temperature, r.top_k, r.top_p))
            groups.setdefault(key, []).append(j)
        head = self.model.output
        for (scale, greedy, *params), group in groups.items():
            rows = torch.cat([local_rows[id(j)] for j in group])
            h = pair_hidden[rows]
            h = h[:, 0] if scale is None else sampling.guide(h[:, 0], h[:, 1], scale)
            logits = head(h).float()
            if greedy:
                toks = logits.argmax(-1)
            else:
                u = torch.cat([sampling.uniforms(j.n, j.generator or self._shared_gen, self.device) for j in group])
                toks = sampling.sample(logits, u, *params)
            self._split_store(group, toks)
        for j in jobs:
            if j.step >= j.n_tokens:
                self._finish(j)

    def _split_store(self, jobs: list[_Job], toks: torch.Tensor) -> None:
        at = 0
        for j in jobs:
            self._store(j, toks[at: at + j.n])
            at += j.n

    def _store(self, job: _Job, tok: torch.Tensor) -> None:
        idx = job.slot_index
        self._out[idx, job.step] = tok
        self._tok[idx] = tok
        self._pos[idx] = self.T + job.step
        job.step += 1

    def _finish(self, job: _Job) -> None:
        codes = self._out[job.slot_index, : job.n_tokens].cpu()
        self._free(job)
        self.stats["requests"] += 1
        self.stats["images"] += job.n
        if not job.future.done():
            try:
                job.future.set_result(Result(codes=codes, seed=job.req.seed, queued_s=job.started - job.submitted,
                                             run_s=time.monotonic() - job.started, first_step=job.first_step,
                                             last_step=self.stats["steps"]))
            except Exception:  # noqa: BLE001 - cancelled between the check and here
                pass
