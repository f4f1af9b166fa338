"""The batched, KV-cached decode session: S streams x B samples = R rows, each row with its own
prompt (any lengths), one model forward per step for all rows; the token picked for sample b is
fed to all its streams.

Prompts of different lengths share one batch by left-padding into the cache: row r's prompt fills
cache slots [P - len_r, P) and gets position ids 0..len_r-1; the model's own forward does this
from the cache's per-row offsets (`KVCache(start=...)`, `CM3LeonLM.forward`).

    session = DecodeSession(model, prompts, n_streams=2, max_new_tokens=1024)   # prefill
    ids = sample_fixed(session, picker, 1024, allowed)                          # [B, 1024]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cm3leon.generation.sampling import Picker
from cm3leon.model import CM3LeonLM
from cm3leon.utils import round_up
from cm3leon.vocab import PAD_ID


class DecodeSession:
    """Prefill R = S x B prompts once, then decode one token per step for all rows in one forward.

    prompts are stream-major: prompts[s * B + b] is stream s of sample b. After construction and
    after each `feed`, `logits` holds the next-token logits float [S, B, V].

    Args:
        model: a CM3LeonLM (eval mode; run under torch.no_grad / inference_mode).
        prompts: R id sequences, any lengths (left-padded internally).
        n_streams: S.
        max_new_tokens: tokens that will be fed after the prompt (sizes the static cache).
        static: attend over the whole preallocated cache every step (fixed shapes; implied by
            cuda_graph and compile). Default: over the slots written so far (faster eager).
        cuda_graph: capture the decode step as a CUDA graph (CUDA only; static shapes make it legal).
        compile: torch.compile the decode step (GPU: pair it with cuda_graph).
    """

    def __init__(
        self,
        model: CM3LeonLM,
        prompts: Sequence[Sequence[int]],
        n_streams: int = 1,
        max_new_tokens: int = 0,
        *,
        static: bool = False,
        cuda_graph: bool = False,
        compile: bool = False,
    ):
        R = len(prompts)
        if R == 0 or R % n_streams:
            raise ValueError(f"{R} prompts cannot be split into {n_streams} streams")
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token (the zero-shot prompt starts with </s>)")
        self.model, self.S, self.B = model, n_streams, R // n_streams
        device = model.tok_emb.weight.device
        self.device = device
        lens = torch.tensor([len(p) for p in prompts], device=device)
        P = int(lens.max())
        if P + max_new_tokens > model.config.max_seq_len:
            raise ValueError(
                f"prompt ({P}) + new tokens ({max_new_tokens}) exceed model.max_seq_len={model.config.max_seq_len}"
            )
        idx = torch.full((R, P), PAD_ID, dtype=torch.long)
        for r, p in enumerate(prompts):
            idx[r, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        idx = idx.to(device)
        start = P - lens  # [R]
        max_len = min(round_up(P + max_new_tokens, 8), model.config.max_seq_len)  # aligned mask rows
        self.cache = model.new_cache(R, max_len, start=start)
        self.max_new_tokens, self._P = max_new_tokens, P
        # keys cut to the written slots on the eager path; static shapes for a graph or a compiled step
        self.dynamic = not (static or cuda_graph or compile)
        self.cache.limit = P if self.dynamic else None
        logits = model(idx, torch.arange(P, device=device), self.cache, last_only=True)
        self.logits = logits[:, -1].float().view(self.S, self.B, -1)
        # decode-step state as static buffers (a CUDA graph replays reads/writes at fixed addresses)
        self._idx = torch.zeros(R, 1, dtype=torch.long, device=device)
        self._slot = torch.tensor([P], device=device)  # next cache slot [1]
        self.n_fed = 0
        self._step = self._decode_step
        if compile:
            self._step = torch.compile(self._decode_step, dynamic=False)
        self._graph = None
        if cuda_graph:
            if device.type != "cuda":
                raise ValueError("cuda_graph=True needs the model on a CUDA device")
            self._capture()

    def _decode_step(self) -> torch.Tensor:
        """One token per row from the static buffers -> logits [R, V]."""
        return self.model(self._idx, self._slot, self.cache, last_only=True)[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream, then capture `_decode_step` into a CUDA graph. The warm-up writes
        the next slot, which the first real step overwrites before anything reads it."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._graph_out = self._step()

    def feed(self, tokens: torch.Tensor) -> None:
        """Append tokens [B] (sample b's token to each of its S streams) and compute the next logits."""
        if self.n_fed >= self.max_new_tokens:  # a Python counter: no device sync per step
            raise ValueError(f"DecodeSession: fed more than max_new_tokens={self.max_new_tokens} tokens")
        self._idx.copy_(tokens.to(self.device, torch.long).repeat(self.S)[:, None])
        if self._graph is not None:
            self._graph.replay()
            logits = self._graph_out
        else:
            self.cache.limit = self._P + self.n_fed + 1 if self.dynamic else None
            logits = self._step()
        self.logits = logits.float().view(self.S, self.B, -1)
        self._slot += 1
        self.n_fed += 1

    def feed_same(self, token_id: int) -> None:
        """Append the same token to every row (e.g. <break>, <eoss>, <sentinel:i>)."""
        self.feed(torch.full((self.B,), int(token_id), dtype=torch.long, device=self.device))


def sample_fixed(
    session: DecodeSession,
    picker: Picker,
    n_tokens: int,
    allowed: torch.Tensor | None,
    then_feed: bool = False,
    on_step: Callable[[int], None] | None = None,
    every: int = 32,
) -> torch.Tensor:
    """Sample exactly n_tokens per sample -> ids [B, n_tokens]. The last one is fed to the session
    only when `then_feed` (the caller continues the sequence). `on_step(t)` is called with the tokens
    sampled so far every `every` steps and after the last one (progress; None: never)."""
    out = torch.empty(session.B, n_tokens, dtype=torch.long, device=session.device)
    for t in range(n_tokens):
        tok = picker(session.logits, allowed)
        out[:, t] = tok
        if then_feed or t + 1 < n_tokens:
            session.feed(tok)
        if on_step is not None and ((t + 1) % every == 0 or t + 1 == n_tokens):
            on_step(t + 1)  # a plain int: reading a GPU tensor here would synchronise every step
    return out


def sample_until(
    session: DecodeSession, picker: Picker, stop_id: int, max_len: int, allowed: torch.Tensor | None
) -> list[list[int]]:
    """Sample per sample until `stop_id` or max_len tokens -> B id lists (stop token excluded).
    Finished samples keep emitting stop_id (not returned) until all are done."""
    done = torch.zeros(session.B, dtype=torch.bool, device=session.device)
    steps = []
    for t in range(max_len):
        tok = torch.where(done, stop_id, picker(session.logits, allowed))
        steps.append(tok)
        done |= tok == stop_id
        if bool(done.all()) or t + 1 == max_len:
            break
        session.feed(tok)
    ids = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(session.B)]
    return [row[: row.index(stop_id)] if stop_id in row else row for row in ids]
