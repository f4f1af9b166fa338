"""The CM3Leon transformer: a decoder-only LM like OPT/metaseq, in one readable file.

Paper choices (PAPER.md section 2) are the defaults of `ModelConfig`: no bias terms, no dropout,
LayerNorm without learnable parameters, pre-LN + final LN, ReLU FFN of width 4d, learned absolute
position embeddings (init std 0.0002), truncated-normal init std 0.006 cut at 3 sigma, residual
output layers (attention out-proj, FFN fc2) initialised to 0, tied input/output embeddings, no
embedding scaling, sequence length 4096.

    cfg = ModelConfig.from_dict(hydra_cfg.model, vocab_size=vocab.size)   # conf/model/<size>.yaml
    model = CM3LeonLM(cfg)
    logits = model(idx)                                 # idx [B, T] long -> logits [B, T, V]

The loss lives outside (the LightningModule): next-token cross-entropy over `loss_mask` targets.

Incremental decoding uses a `KVCache` beside the model: preallocated static tensors
[B, H, max_len, hd] per layer, written in place, so that a decode step has static shapes and can be
compiled / CUDA-graphed later:

    cache = model.new_cache(batch_size=B, max_len=T_max)
    logits = model(prompt, input_pos=torch.arange(T0), cache=cache)          # prefill [B, T0, V]
    logits = model(next_tok, input_pos=torch.tensor([T0]), cache=cache)      # one step [B, 1, V]

Prompts of different lengths share one cache left-padded (`new_cache(..., start=P - lengths)`):
the same forward then gives each row its own position ids and padding mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cm3leon.errors import UsageError
from cm3leon.loss import fused_linear_cross_entropy
from cm3leon.vocab import Vocab

if TYPE_CHECKING:  # imported lazily at run time (~0.8 s), only when attn_impl="flex" is used
    from torch.nn.attention.flex_attention import BlockMask

# The sizes (the paper's 350m / 760m / 7b, PAPER.md section 2, and a CPU-sized tiny) are
# conf/model/<size>.yaml: only what differs from these defaults, on top of this dataclass as the
# Hydra schema (cm3leon.config; `load_model_config(conf_dir, "350m")` outside Hydra apps).

_NORMS = ("layernorm_noaffine", "layernorm", "rmsnorm")
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
_POS_EMBS = ("learned", "none")
_ATTN_IMPLS = ("auto", "sdpa", "math", "flex")


def _paper_vocab_size() -> int:
    return Vocab.paper().size  # 66,056 rows: 65,536 base ids + <break>, <eoss>, 514 sentinels, padded to x8


@dataclass
class ModelConfig:
    """Every architectural choice, defaulting to the paper's (PAPER.md section 2)."""

    n_layer: int
    d_model: int
    n_head: int
    name: str = "custom"
    ffn_mult: int = 4  # FFN hidden width = ffn_mult * d_model
    vocab_size: int = field(default_factory=_paper_vocab_size)  # embedding rows (Vocab.size)
    max_seq_len: int = 4096  # rows of the learned position table
    bias: bool = False
    dropout: float = 0.0  # residual and attention dropout
    norm: str = "layernorm_noaffine"  # LayerNorm without learnable parameters
    norm_eps: float = 1e-5
    pre_ln: bool = True
    final_ln: bool = True  # LN after the last block (used with pre_ln)
    activation: str = "relu"
    pos_emb: str = "learned"
    pos_init_std: float = 0.0002
    init_std: float = 0.006  # truncated normal ...
    init_trunc_sigmas: float = 3.0  # ... cut at +-3 sigma
    zero_init_residual_out: bool = True  # attention out-proj and FFN fc2 start at 0
    tie_embeddings: bool = True
    embed_scale: float = 1.0  # token embeddings are multiplied by this (1.0: no scaling)
    # "sdpa" (F.scaled_dot_product_attention; flash kernels for plain causal rows), "math"
    # (reference), "flex" (FlexAttention for training forwards, compiled on CUDA: packed rows skip
    # the cross-example blocks; no attention dropout; CPU: forward only; decoding with a KV cache
    # goes through SDPA) or "auto": flex for packed rows (doc_ids) on CUDA without attention
    # dropout, sdpa otherwise
    attn_impl: str = "auto"
    activation_checkpointing: bool = False  # recompute each block in backward

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise UsageError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        for what, value, allowed in (
            ("norm", self.norm, _NORMS),
            ("activation", self.activation, tuple(_ACTIVATIONS)),
            ("pos_emb", self.pos_emb, _POS_EMBS),
            ("attn_impl", self.attn_impl, _ATTN_IMPLS),
        ):
            if value not in allowed:
                raise UsageError(f"model.{what}={value!r} is not one of {allowed}")
        if self.vocab_size <= 0 or self.max_seq_len <= 0:
            raise UsageError("model.vocab_size and model.max_seq_len must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_ff(self) -> int:
        return self.ffn_mult * self.d_model

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """From a Hydra `model` node (conf/model/*.yaml). `vocab_size: null` means "from the data":
        pass `vocab_size=vocab.size`; left null it becomes the paper's table size. The node's
        `recipe` (LR, warmup, batch: training settings, not architecture) is ignored."""
        d = {k: v for k, v in {**dict(d), **overrides}.items() if k != "recipe"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"model config has unknown keys {unknown}; known keys: {sorted(known)}")
        if d.get("vocab_size") is None:
            d["vocab_size"] = _paper_vocab_size()
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys/values for incremental decoding: per layer two tensors [B, H, max_len, hd].

    The tensors never change shape or address (writes are `index_copy_`), so a decode step is
    static-shaped. Writes go to cache *slots* `input_pos` [T], shared by the batch.

    Padding: prompts of different lengths share a batch left-padded. `start` [B] is row b's first
    valid slot; its tokens sit at slots start[b].. with position ids 0, 1, ... (`positions`). Pad
    slots are masked out of attention; a pad query sees only itself (no row is fully masked, so pad
    states stay finite). Without `start` every row starts at slot 0 and slots are positions.

    `limit` (an int, or None for the static max_len) cuts keys/values and the mask to the first
    `limit` slots: on CPU attention then costs what has been written, not the whole cache; the
    static form (None) is what a CUDA graph replays.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        start: torch.Tensor | None = None,
        device=None,
        dtype=torch.float32,
    ):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.batch_size, self.max_len = batch_size, max_len
        self.limit: int | None = None
        self.start = None if start is None else start.to(device=device, dtype=torch.long)
        self._keys = torch.arange(max_len, device=device)
        if self.start is not None:
            if self.start.shape != (batch_size,):
                raise ValueError(f"KVCache start must have shape [{batch_size}], got {tuple(self.start.shape)}")
            self._valid = self._keys[None, :] >= self.start[:, None]  # [B, S]
            # the same as an additive mask in the cache's dtype: SDPA would convert a bool mask to
            # this in every layer of every decode step
            self._bias = torch.zeros(self._valid.shape, dtype=dtype, device=device).masked_fill(
                ~self._valid, float("-inf")
            )  # [B, S]

    def positions(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Position ids of the tokens written at slots input_pos [T]: [T] (no padding) or [B, T]."""
        if self.start is None:
            return input_pos
        return (input_pos[None, :] - self.start[:, None]).clamp(min=0)

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H, T, hd] at slots input_pos [T]; return k, v [B, H, limit or max_len, hd]."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
        v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
        if self.limit is None:
            return k_cache, v_cache
        return k_cache[:, :, : self.limit], v_cache[:, :, : self.limit]

    def attn_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Which cached slots each query (at slots input_pos [T]) sees: bool [T, S] without padding;
        with padding bool [B, 1, T, S] (or, for one eager decode step, the additive padding mask
        [B, 1, 1, S] as a view: no work per step). S = limit or max_len."""
        keys = self._keys[: self.limit]
        causal = keys[None, :] <= input_pos[:, None]  # [T, S]
        if self.start is None:
            return causal
        if self.limit is not None and input_pos.numel() == 1:
            # eager decode step: the one query is the newest slot (limit - 1), so causality holds
            # for every kept key and the mask is the rows' padding alone
            return self._bias[:, None, None, : self.limit]
        own = keys[None, :] == input_pos[:, None]  # [T, S]
        valid = self._valid[:, : self.limit]
        return ((valid[:, None, :] & causal[None]) | own[None])[:, None]

    def reset(self) -> None:
        for t in self.k + self.v:
            t.zero_()


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
def _make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm_noaffine":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, elementwise_affine=False)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, elementwise_affine=False)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal attention of packed rows: doc_ids [B, T] -> bool [B, 1, T, T], True
    where query t may see key s (same example, s <= t). The diagonal is always True, so no row is
    fully masked (padding, with an id of its own, sees itself and the padding before it)."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must have shape [B, T], got {tuple(doc_ids.shape)}")
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def document_block_mask(doc_ids: torch.Tensor | None, T: int, device: torch.device | str) -> BlockMask:
    """The FlexAttention form of `document_mask`: a BlockMask on `device` for [B, H, T, T] scores
    (B = 1 and broadcast when doc_ids is None: plain causal). mask_mod(b, h, q, kv) = same example
    and kv <= q.

    Built once per forward (CM3LeonLM.forward) and shared by every layer: it costs a pass over
    all T x T pairs (like the dense mask), while each layer's attention then visits only the
    128 x 128 blocks it marks as (partly) visible. Any T works: the last block is partial.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if doc_ids is None:

        def mask_mod(b, h, q, kv):
            return kv <= q

        return create_block_mask(mask_mod, None, None, T, T, device=device)
    if doc_ids.dim() != 2 or doc_ids.shape[1] != T:
        raise ValueError(f"doc_ids must have shape [B, {T}], got {tuple(doc_ids.shape)}")

    def doc_mask_mod(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (kv <= q)

    return create_block_mask(doc_mask_mod, doc_ids.shape[0], None, T, T, device=device)


_compiled_flex_attention = None  # torch.compile(flex_attention), made on first CUDA use


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """q, k, v [B, H, T, hd] -> [B, H, T, hd]. On CUDA the compiled (fused Triton) kernel, compiled
    once per process; elsewhere eager flex_attention, which materialises the scores and, on CPU
    (torch 2.14), has no backward: a reference for tests, not for training."""
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim, self.impl = cfg.n_head, cfg.head_dim, cfg.attn_impl
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)  # residual output
        self.attn_dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | BlockMask | None = None,
    ):
        """x [B, T, C] -> [B, T, C]. mask: None (causal), a tensor (bool or additive, [T, S] or
        [B, 1, T, S]) or, with attn_impl="flex" and no cache, a BlockMask (`document_block_mask`)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # [B, T, C] -> [B, H, T, hd]
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, input_pos, k, v)  # [B, H, max_len, hd]
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.attn_dropout if self.training else 0.0
        if mask is not None and not isinstance(mask, torch.Tensor):  # a BlockMask: flex training forward
            y = _flex_attention(q, k, v, mask)  # no dropout (refused in CM3LeonLM.forward)
        elif self.impl != "math":  # sdpa; auto and flex decode (tensor masks from the KV cache) with SDPA
            if mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:  # explicit reference implementation
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # [B, H, T, S]
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            # mask: bool (True = may attend) or additive float, as SDPA takes it
            att = (att + mask if mask.is_floating_point() else att.masked_fill(~mask, float("-inf"))).softmax(dim=-1)
            att = F.dropout(att, dropout_p, training=self.training)
            y = att @ v
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)  # residual output
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.ln1, self.ln2 = _make_norm(cfg), _make_norm(cfg)
        self.attn, self.mlp = CausalSelfAttention(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, input_pos=None, cache=None, layer=0, mask=None):
        if self.pre_ln:
            x = x + self.drop(self.attn(self.ln1(x), input_pos, cache, layer, mask))
            return x + self.drop(self.mlp(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x, input_pos, cache, layer, mask)))
        return self.ln2(x + self.drop(self.mlp(x)))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class CM3LeonLM(nn.Module):
    """Decoder-only LM over the joint text+image vocabulary. forward: idx [B, T] -> logits [B, T, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = _make_norm(cfg) if (cfg.final_ln and cfg.pre_ln) else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Paper init: truncated normal std 0.006 at +-3 sigma everywhere, position table std 0.0002,
        biases 0, residual output layers 0 (each block starts as the identity)."""
        cfg = self.config
        std, cut = cfg.init_std, cfg.init_trunc_sigmas
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, 0.0, std, -cut * std, cut * std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.pos_emb is not None:
            s = cfg.pos_init_std
            nn.init.trunc_normal_(self.pos_emb.weight, 0.0, s, -cut * s, cut * s)
        if cfg.zero_init_residual_out:
            for block in self.blocks:
                nn.init.zeros_(block.attn.out_proj.weight)
                nn.init.zeros_(block.mlp.fc2.weight)

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
        doc_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        loss_chunk: int = 8192,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """idx [B, T] long -> logits [B, T, V] ([B, 1, V] with last_only: the last position only).

        With targets [B, T] (training and validation; -100: no loss): no logits are returned or
        kept; the output head and the cross-entropy run together, `loss_chunk` tokens at a time
        (`cm3leon.loss.fused_linear_cross_entropy`), -> (sum of the losses: a scalar with
        gradients, per-token fp32 losses [B, T]). Inside this forward, so that a sharded (FSDP)
        head is gathered while it runs.

        Without a cache: a causal forward over idx; input_pos gives the position ids, [T] shared
        by the batch or [B, T] per row (default 0..T-1).
        Packed rows (`cm3leon.data.packing`): doc_ids [B, T] int names the example each position
        belongs to (padding an id of its own); attention is then block-diagonal causal (a query
        sees the keys of its own example at positions <= its own), and input_pos [B, T] should
        restart at 0 per example. Each example then gets exactly the logits it gets alone.
        The mask is built once here and passed to every block: a dense bool [B, 1, T, T]
        (`document_mask`), or with attn_impl="flex" a BlockMask (`document_block_mask`, also for
        plain causal rows).
        With a cache: input_pos [T] are the cache slots the tokens are written to (shared by the
        batch); each query attends to the cached slots <= its own. The position ids are the slots,
        or, when the cache holds left-padded rows, the slots minus each row's offset
        (`KVCache.positions`): batched prompts of different lengths decode in one forward.
        """
        B, T = idx.shape
        if cache is None:
            pos = torch.arange(T, device=idx.device) if input_pos is None else input_pos
            if pos.shape not in ((T,), (B, T)):
                raise ValueError(f"input_pos must have shape [{T}] or [{B}, {T}], got {tuple(pos.shape)}")
            if self.config.max_seq_len < T:
                raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.config.max_seq_len}")
            impl = self.config.attn_impl
            if impl == "auto":
                no_dropout = not (self.training and self.config.dropout > 0)
                impl = "flex" if doc_ids is not None and idx.is_cuda and no_dropout else "sdpa"
            if impl == "flex":
                if self.training and self.config.dropout > 0:
                    raise ValueError("attn_impl=flex has no attention dropout; set dropout=0 or attn_impl=sdpa")
                mask = document_block_mask(doc_ids, T, idx.device)  # once, for every layer
            else:
                mask = None if doc_ids is None else document_mask(doc_ids)
        else:
            if doc_ids is not None:
                raise ValueError("doc_ids (packed rows) is for training forwards, not with a KV cache")
            if input_pos is None or input_pos.shape != (T,):
                raise ValueError(f"with a cache, pass input_pos of shape [{T}] (the cache slots of idx)")
            mask = cache.attn_mask(input_pos)
            pos = cache.positions(input_pos)
        x = self.tok_emb(idx)  # [B, T, d]
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)  # [T, d] broadcast over B, or [B, T, d]
        x = self.drop(x)
        ckpt = self.config.activation_checkpointing and self.training and cache is None
        for i, block in enumerate(self.blocks):
            if ckpt:
                x = checkpoint(block, x, None, None, i, mask, use_reentrant=False)
            else:
                x = block(x, input_pos, cache, i, mask)
        if targets is not None:
            return fused_linear_cross_entropy(self.ln_f(x), self.lm_head.weight, targets, loss_chunk)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x))  # [B, T, V]

    def new_cache(
        self, batch_size: int, max_len: int | None = None, *, start: torch.Tensor | None = None, device=None, dtype=None
    ) -> KVCache:
        """An empty KV cache for this model (default: max_seq_len slots, the weights' device/dtype);
        `start` [B]: first valid slot per row for left-padded prompts (see `KVCache`)."""
        cfg, w = self.config, self.tok_emb.weight
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
        return KVCache(
            cfg.n_layer,
            batch_size,
            cfg.n_head,
            max_len,
            cfg.head_dim,
            start=start,
            device=w.device if device is None else device,
            dtype=w.dtype if dtype is None else dtype,
        )

    # ---- accounting ----------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (the tied table counted once). exclude_embeddings drops the token and
        position tables and an untied output head: what remains is the transformer body."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) = 6 N + 12 L d T (PaLM appendix B, nanoGPT).

        N counts every parameter that takes part in a matmul: the transformer body plus the output
        head V x d (once, tied or not). Lookup tables (token and position embeddings) cost no FLOPs
        and are left out. 12 L d T is the attention score/value matmuls at sequence length T
        (full T x T, not halved for causality, as in PaLM's MFU).
        """
        cfg = self.config
        T = cfg.max_seq_len if seq_len is None else seq_len
        n_matmul = self.num_params(exclude_embeddings=True) + cfg.vocab_size * cfg.d_model
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * T
