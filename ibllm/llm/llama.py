"""LLaMA with the ImageBind-LLM extras, in one file (REFERENCE.md section 4).

On top of Meta's LLaMA (RMSNorm, RoPE on consecutive even/odd pairs, SwiGLU) every block has, when the config
asks for them:

- biases on ``wq``, ``wo``, ``w1``, ``w2``, ``w3`` (not ``wk``/``wv``) — ``LlamaConfig.w_bias``;
- rank-r LoRA without scaling, ``lora_w{q,k,v,o}_l1/l2`` and ``lora_w{1,2,3}_l1/l2`` (l1: in→r, l2: r→out) —
  ``LlamaConfig.w_lora``. q/k/v/w1/w3 see the normed input, ``lora_wo`` the attention output, ``lora_w2`` the
  SwiGLU product;
- ``attention.gate`` (1, n_heads, 1, 1): the zero-initialised gate of the visual injection (``gate.TanhGate``;
  its parameter is ``attention.gate.scale`` here, renamed by ``OFFICIAL_KEYS``).

Visual injection: in each of the last ``query_layer`` blocks the adapter ``a_l = visual_query + prefix_query[l]``
(B, 1, D) goes *un-normed* through that block's base ``wv`` (no LoRA, no RoPE) and ``tanh(gate) * wv(a_l)`` is
added, per head, to every position's attention output before ``wo``. That term does not depend on the token, so
``Transformer.visual_injection`` computes it once per request and ``forward`` only adds it.

Native LoRA layout: the ``lora_*`` Linears are ordinary submodules, so ``state_dict()`` is the official layout
(under ``llama.`` in the official files) up to the gate's name (``OFFICIAL_KEYS``). For stage-2 training
``ibllm.llm.lora.to_peft`` swaps them for peft LoRA layers and ``from_peft`` swaps them back; for inference
``merge_lora`` folds them into the base weights.

KV cache: a static ``KVCache`` (kvcache.py), allocated once by ``setup_cache`` (max_batch_size x max_seq_len) or
handed to ``forward`` by its owner (the serving scheduler keeps one row per slot); the rotary table is computed on
first use; neither is in the state dict. Two kinds of call:

- ``forward(tokens, start_pos: int)``: every row writes positions ``start_pos .. start_pos+T-1`` and attends to
  ``0 .. start_pos+T-1`` with the causal mask shifted by start_pos (prefill, training, the reference's batch
  generate, single-request decoding);
- ``forward(tokens (B, 1), positions: (B,) tensor)``: the batched decode step. Row r takes its own rotary row,
  writes its key/value at ``positions[r]`` and attends to ``0 .. positions[r]`` only, so rows of different lengths
  (ragged conversations) share one call; positions past a row's length are masked, never read.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ibllm.checkpoint import KeyTable
from ibllm.config import LlamaConfig
from ibllm.halfgemm import float32_gemm
from ibllm.llm.gate import TanhGate
from ibllm.llm.gemv import use_gemv
from ibllm.llm.kvcache import KVCache, LayerCache
from ibllm.llm.packed import pack_linears

OFFICIAL_KEYS = KeyTable([("layers.{}.attention.gate", "layers.{}.attention.gate.scale")])
"""Official LLaMA-adapter names <-> this module's: only the gate differs (a ``TanhGate`` holds it)."""


def is_finetuned(name: str) -> bool:
    """Whether stage 2 trains this LLaMA parameter (its name in this module): norms, biases and LoRA only
    (REFERENCE.md section 6). The gates are trained in stage 1."""
    return "lora_" in name or name.endswith(".bias") or name.endswith("norm.weight")


class RMSNorm(nn.Module):
    """Meta's RMSNorm: normalise in float32, cast back, then scale (the cast-before-scale order matters in fp16)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same arithmetic in one call instead of seven (bit-identical here): a decode step of a small model
            # is bound by the number of calls.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def precompute_rope(head_dim: int, positions: int, theta: float = 10000.0,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary table (positions, head_dim // 2, 2) of (cos, sin), float32, frequencies theta^(-2i/head_dim)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), freqs)
    return torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive (even, odd) pairs of each head, in float32. x: (B, T, H, hd); rope: (T, hd/2, 2) shared
    by every row, or (B, T, hd/2, 2) per row (rows at different positions).

    Real arithmetic, not Meta's complex multiplication (one call instead of seven in eager mode): inductor has no
    complex kernels, and a compiled step with it measured x1.7 of the reference against x2.3-2.5 without (separate
    runs on a loaded machine; kept real until a side-by-side run says otherwise)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    if rope.ndim == 3:
        rope = rope[None]
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def _base(linear: nn.Module) -> nn.Module:
    """The plain Linear under a peft LoRA wrapper (or the module itself): the injection must skip LoRA."""
    get = getattr(linear, "get_base_layer", None)
    return get() if get is not None else linear


def _times_weight(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ linear.weight^T`` without the bias, through the layer's own product where it has one (a quantised or
    kernel-backed Linear: ``F.linear`` on a torchao weight would dequantise the whole matrix, 5x slower)."""
    own = getattr(linear, "weight_product", None)
    return own(x) if own is not None else F.linear(x, linear.weight)


def _lora_pair(enabled: bool, d_in: int, d_out: int, rank: int) -> tuple[nn.Linear | None, nn.Linear | None]:
    if not enabled:
        return None, None
    l1 = nn.Linear(d_in, rank, bias=False)
    l2 = nn.Linear(rank, d_out, bias=False)
    nn.init.zeros_(l2.weight)  # LoRA starts as the identity update, as in the reference
    return l1, l2


def _with_lora(y: torch.Tensor, x: torch.Tensor, l1: nn.Module | None, l2: nn.Module | None) -> torch.Tensor:
    return y if l1 is None else y + l2(l1(x))


@torch.no_grad()
def _fold(owner: nn.Module, name: str, values_per_step: int = 1 << 22) -> None:
    """Fold ``lora_{name}_l2 @ lora_{name}_l1`` into ``owner.{name}.weight`` (in float32) and drop the pair.

    A few rows at a time, so merging a 7B model needs no second copy of any weight (peak memory while loading): at
    most ``values_per_step`` values per step (16 MB in float32 for each of the 3 temporaries; by rows alone, 1024
    rows of w2's 11008 columns made them 45 MB each)."""
    l1, l2 = getattr(owner, f"lora_{name}_l1"), getattr(owner, f"lora_{name}_l2")
    if l1 is None:
        return
    weight = getattr(owner, name).weight
    rows_per_step = max(1, values_per_step // weight.shape[1])
    down = l1.weight.float()
    for start in range(0, weight.shape[0], rows_per_step):
        rows = slice(start, start + rows_per_step)
        weight[rows] = (weight[rows].float() + l2.weight[rows].float() @ down).to(weight.dtype)
    setattr(owner, f"lora_{name}_l1", None)
    setattr(owner, f"lora_{name}_l2", None)


@torch.no_grad()
def _concat(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing ``linears`` side by side (their outputs concatenated); a missing bias is zeros."""
    weight = torch.cat([lin.weight for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=any(lin.bias is not None for lin in linears),
                      device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias if lin.bias is not None else weight.new_zeros(lin.out_features)
                                             for lin in linears]), requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, r = cfg.dim, cfg.lora_rank
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(d, d, bias=cfg.w_bias)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=cfg.w_bias)
        self.lora_wq_l1, self.lora_wq_l2 = _lora_pair(cfg.w_lora, d, d, r)
        self.lora_wk_l1, self.lora_wk_l2 = _lora_pair(cfg.w_lora, d, d, r)
        self.lora_wv_l1, self.lora_wv_l2 = _lora_pair(cfg.w_lora, d, d, r)
        self.lora_wo_l1, self.lora_wo_l2 = _lora_pair(cfg.w_lora, d, d, r)
        self.gate = TanhGate(cfg.n_heads)
        self.wqkv: nn.Linear | None = None  # ``fuse``: wq|wk|wv as one matmul (inference)

    def injection(self, adapter: torch.Tensor) -> torch.Tensor:
        """``tanh(gate) * wv(adapter)`` per head: (B, 1, D) -> (B, H, 1, head_dim). Base wv only (no LoRA)."""
        b = adapter.shape[0]
        v = _times_weight(_base(self.wv), adapter).view(b, -1, self.n_heads, self.head_dim).transpose(1, 2)
        if v.shape[2] != 1:
            raise ValueError("only query_len 1 is supported (ImageBind-LLM's setting)")
        return self.gate(v)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor, rope: torch.Tensor,
                injection: torch.Tensor | None, cache: LayerCache | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hd = self.n_heads, self.head_dim
        if self.wqkv is not None:  # one matmul, one rotation for q and k together
            qk, v = self.wqkv(x).split([2 * h * hd, h * hd], dim=-1)
            q, k = apply_rope(qk.view(b, t, 2 * h, hd), rope).split(h, dim=2)
            v = _with_lora(v, x, self.lora_wv_l1, self.lora_wv_l2).view(b, t, h, hd)
        else:
            q = _with_lora(self.wq(x), x, self.lora_wq_l1, self.lora_wq_l2).view(b, t, h, hd)
            k = _with_lora(self.wk(x), x, self.lora_wk_l1, self.lora_wk_l2).view(b, t, h, hd)
            v = _with_lora(self.wv(x), x, self.lora_wv_l1, self.lora_wv_l2).view(b, t, h, hd)
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if isinstance(start_pos, torch.Tensor):  # batched decode step: row r at its own position start_pos[r]
            cache.write_at(start_pos, k[:, :, 0], v[:, :, 0])
            cache_k, cache_v = cache.read(b, mask.shape[-1])  # positions 0..span-1 (Transformer.forward)
            if torch.compiler.is_compiling():
                # One query row per head: written out, inductor fuses the scaling, mask and softmax into its own
                # kernels, where the CPU SDPA kernel costs ~0.1 ms a call at the toy size (measured, profiler).
                scores = (q @ cache_k.transpose(-1, -2)) * hd**-0.5
                weights = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1)
                out = weights.type_as(q) @ cache_v
            else:
                out = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)
        else:
            if cache is not None:
                cache.write(start_pos, k, v)
                if start_pos > 0:  # from position 0 the new keys are all there is: nothing to read back
                    k, v = cache.read(b, start_pos + t)
            s = k.shape[2]
            if t == 1:
                out = F.scaled_dot_product_attention(q, k, v)  # one new token sees every cached position
            elif s == t:
                # Rows padded on the right (prompts of different lengths prefilled together) need no more than
                # this: a real token never attends to the padding after it.
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # several new tokens after a cached prefix: causal mask shifted by start_pos
                allowed = (torch.arange(s, device=x.device)[None, :]
                           <= (s - t) + torch.arange(t, device=x.device)[:, None])
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        if injection is not None:
            out = out + injection
        out = out.transpose(1, 2).reshape(b, t, -1)
        return _with_lora(self.wo(out), out, self.lora_wo_l1, self.lora_wo_l2)

    def merge_lora(self) -> None:
        # wv keeps its LoRA separate: the visual injection needs the un-adapted wv (a rank-r add per token is
        # ~2r/D of the wv matmul, i.e. <1% at 7B, versus keeping a second D x D copy of wv per layer).
        for name in ("wq", "wk", "wo"):
            _fold(self, name)

    def fuse(self) -> None:
        """wq|wk|wv as one Linear (after ``merge_lora``; inference only). wv's LoRA stays a separate add, and wv
        stays a view of its rows of the fused weight: the injection needs the un-adapted wv, at no extra memory."""
        if self.wqkv is not None:
            return
        if self.lora_wq_l1 is not None or self.lora_wk_l1 is not None:
            raise ValueError("merge the LoRA of wq/wk (merge_lora) before fusing")
        d = self.wv.weight.shape[0]
        self.wqkv = _concat(self.wq, self.wk, self.wv)
        self.wv.weight = nn.Parameter(self.wqkv.weight[2 * d:], requires_grad=False)
        self.wq = self.wk = None


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, h, r = cfg.dim, cfg.ffn_hidden_dim, cfg.lora_rank
        self.w1 = nn.Linear(d, h, bias=cfg.w_bias)
        self.w2 = nn.Linear(h, d, bias=cfg.w_bias)
        self.w3 = nn.Linear(d, h, bias=cfg.w_bias)
        self.lora_w1_l1, self.lora_w1_l2 = _lora_pair(cfg.w_lora, d, h, r)
        self.lora_w2_l1, self.lora_w2_l2 = _lora_pair(cfg.w_lora, h, d, r)
        self.lora_w3_l1, self.lora_w3_l2 = _lora_pair(cfg.w_lora, d, h, r)
        self.w13: nn.Linear | None = None  # ``fuse``: w1|w3 as one matmul (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate = _with_lora(self.w1(x), x, self.lora_w1_l1, self.lora_w1_l2)
            up = _with_lora(self.w3(x), x, self.lora_w3_l1, self.lora_w3_l2)
        h = F.silu(gate) * up
        return _with_lora(self.w2(h), h, self.lora_w2_l1, self.lora_w2_l2)

    def merge_lora(self) -> None:
        for name in ("w1", "w2", "w3"):
            _fold(self, name)

    def fuse(self) -> None:
        """w1|w3 as one Linear (after ``merge_lora``; inference only)."""
        if self.w13 is not None:
            return
        if self.lora_w1_l1 is not None or self.lora_w3_l1 is not None:
            raise ValueError("merge the LoRA of w1/w3 (merge_lora) before fusing")
        self.w13 = _concat(self.w1, self.w3)
        self.w1 = self.w3 = None


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor, rope: torch.Tensor,
                injection: torch.Tensor | None, cache: LayerCache | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, rope, injection, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """LLaMA + ImageBind-LLM extras. ``query_layer``: how many of the last blocks get the visual injection."""

    def __init__(self, cfg: LlamaConfig, query_layer: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.query_layer = cfg.n_layers if query_layer is None else query_layer
        if not 0 <= self.query_layer <= cfg.n_layers:
            raise ValueError(f"query_layer {self.query_layer} outside 0..{cfg.n_layers}")
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Rotary table: 2 * max_seq_len positions as Meta's code. A plain attribute, not a buffer, so that it is not
        # in the state dict and ``model.to(torch.float16)`` cannot lower it: rotation stays float32 as in Meta's code.
        self.rope: torch.Tensor | None = None
        self.lora_merged = False
        self.kv_cache: KVCache | None = None  # setup_cache's; not a buffer either: never in the state dict

    @property
    def first_query_layer(self) -> int:
        return self.cfg.n_layers - self.query_layer

    @property
    def max_seq_len(self) -> int:
        """Positions available to generation: the KV cache's length once allocated, else the config's."""
        return self.cache_len or self.cfg.max_seq_len

    @property
    def cache_batch(self) -> int:
        return self.kv_cache.batch if self.kv_cache is not None else 0

    @property
    def cache_len(self) -> int:
        return self.kv_cache.seq_len if self.kv_cache is not None else 0

    def _ensure_rope(self, device: torch.device) -> torch.Tensor:
        # Computed on first use on the device of the tokens (so a model built on the meta device needs nothing).
        if self.rope is None or self.rope.device != device:
            self.rope = precompute_rope(self.cfg.head_dim, 2 * self.cfg.max_seq_len, self.cfg.rope_theta, device)
        return self.rope

    def new_cache(self, batch: int, seq_len: int | None = None, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for this model (defaults: the config's length, the weights' device and dtype)."""
        weight = self.output.weight
        device = torch.device(device) if device is not None else weight.device
        s = seq_len or self.cfg.max_seq_len
        if s > 2 * self.cfg.max_seq_len:
            raise ValueError(f"max_seq_len {s} exceeds the rotary table ({2 * self.cfg.max_seq_len})")
        self._ensure_rope(device)
        return KVCache.empty(self.cfg.n_layers, batch, self.cfg.n_heads, s, self.cfg.head_dim, device=device,
                             dtype=dtype or weight.dtype)

    def setup_cache(self, max_batch_size: int | None = None, max_seq_len: int | None = None, *,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate this model's own static KV cache once (defaults: the config's sizes, the weights' device and
        dtype). ``forward`` uses it when no other cache is passed."""
        self.kv_cache = None  # free the old one before allocating the new one
        self.kv_cache = self.new_cache(max_batch_size or self.cfg.max_batch_size, max_seq_len, device=device,
                                       dtype=dtype)

    def clear_cache(self) -> None:
        """Free the KV cache (e.g. before training)."""
        self.kv_cache = None

    def injection_buffer(self, batch: int) -> torch.Tensor | None:
        """Zeros shaped like ``visual_injection`` for ``batch`` rows (None without query layers): a row of zeros is
        "no visual input", since the injection is added."""
        if self.query_layer == 0:
            return None
        weight = self.output.weight
        return torch.zeros(self.query_layer, batch, self.cfg.n_heads, 1, self.cfg.head_dim, device=weight.device,
                           dtype=weight.dtype)

    def visual_injection(self, adapters: torch.Tensor) -> torch.Tensor:
        """Per-layer gated value vectors from the adapters (query_layer, B, 1, D): (query_layer, B, H, 1, hd).

        Compute once per request; ``forward`` adds slice l to the attention output of block first_query_layer+l.
        """
        if adapters.shape[0] != self.query_layer:
            raise ValueError(f"expected {self.query_layer} adapters (one per query layer), got {adapters.shape[0]}")
        layers = self.layers[self.first_query_layer:]
        return torch.stack([layer.attention.injection(a) for layer, a in zip(layers, adapters, strict=True)])

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, injection: torch.Tensor | None = None,
                *, last_only: bool = False, use_cache: bool | None = None, cache: KVCache | None = None,
                lengths: torch.Tensor | None = None, span: int | None = None) -> torch.Tensor:
        """Logits (float32) for ``tokens`` (B, T): (B, T, V), or (B, V) if last_only.

        ``start_pos``: an int (every row at positions start_pos..), or a (B,) tensor of per-row positions for the
        one-token batched decode step (see the module docstring). ``cache``: the KV cache to read and write, else
        this model's own (``setup_cache``). ``use_cache`` defaults to "a KV cache is given or allocated"; False
        means the call sees only ``tokens`` (training). ``lengths`` (B,): rows padded on the right, row r's tokens
        being its first lengths[r]; with last_only its logits are those of its own last token (several prompts
        prefilled in one call). The padding's keys and values are written to the cache past each row's length, where
        that row's later steps overwrite them before they are ever attended to. ``span`` (decode step only): every
        row's position is below it, so attention reads cache positions 0..span-1 rather than all of them (None: all;
        a compiled step keeps the full length, one static shape).
        """
        b, t = tokens.shape
        if use_cache is None:
            use_cache = cache is not None or self.kv_cache is not None
        if not use_cache:
            cache = None
        elif cache is None:
            if self.kv_cache is None:
                self.setup_cache()
            cache = self.kv_cache
        rope_table = self._ensure_rope(tokens.device)
        mask = None
        if isinstance(start_pos, torch.Tensor):
            if t != 1 or cache is None:
                raise ValueError("per-row positions are for the one-token decode step through a KV cache")
            if b > cache.batch:
                raise ValueError(f"batch {b} exceeds the KV cache ({cache.batch} rows)")
            if span is not None and not 0 < span <= cache.seq_len:
                raise ValueError(f"span {span} outside the KV cache's 1..{cache.seq_len} positions")
            rope = rope_table[start_pos].unsqueeze(1)  # (B, 1, hd/2, 2): each row's own rotation
            # Reading only the positions in use: a cache that earlier, longer conversations filled costs bandwidth
            # past them (measured: a 1024x8 step of 8 rows over 256 positions, 62.6 -> 57.2 ms with span 96).
            seen = torch.arange(span or cache.seq_len, device=tokens.device)
            mask = (seen <= start_pos[:, None])[:, None, None, :]
            rows = cache.index if cache.index is not None else torch.arange(b, device=tokens.device)
        else:
            start_pos = int(start_pos)
            if cache is not None and (b > cache.batch or start_pos + t > cache.seq_len):
                raise ValueError(f"batch {b} x positions {start_pos}+{t} exceed the KV cache "
                                 f"({cache.batch} x {cache.seq_len})")
            rope = rope_table[start_pos:start_pos + t]
            rows = None
        h = self.tok_embeddings(tokens)
        first = self.first_query_layer
        # Several tokens (prefill, training): half-precision weights multiply in float32 where that is faster here.
        weight = self.tok_embeddings.weight
        with float32_gemm(weight.dtype, weight.device) if t > 1 else contextlib.nullcontext():
            for i, layer in enumerate(self.layers):
                inj = injection[i - first] if injection is not None and i >= first else None
                h = layer(h, start_pos, rope, inj, None if cache is None else cache.layer(i, rows), mask)
            if last_only:
                h = h[:, -1] if lengths is None else h[torch.arange(b, device=h.device), lengths.to(h.device) - 1]
            logits = self.output(self.norm(h))
        return logits if logits.dtype == torch.float32 else logits.float()

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold every LoRA pair except wv's into its base weight (inference only; irreversible).

        Same outputs to rounding, 12 fewer small matmuls per block. Afterwards ``state_dict()`` no longer has the
        official layout (merged base weights, only ``lora_wv_*`` left): reload the checkpoint to save or train.
        """
        if _base(self.layers[0].attention.wq) is not self.layers[0].attention.wq:
            raise ValueError("the model is wrapped by peft: convert back with ibllm.llm.lora.from_peft first")
        for layer in self.layers:
            layer.attention.merge_lora()
            layer.feed_forward.merge_lora()
        self.lora_merged = self.cfg.w_lora

    def pack_for_rows(self, rows: int) -> int:
        """Give the decode step's float32 CPU Linears a copy of their weight packed for products of ``rows`` rows
        (``llm.packed``; inference only, after ``merge_lora``/``fuse_projections``); how many were packed."""
        return pack_linears(self, rows)

    def use_gemv(self) -> int:
        """Send the decode step's small products (``llm.gemv.max_rows``) of float32 or half CPU weights through
        ibllm's kernel (``llm.gemv``; built on first use, a no-op where it cannot be); how many Linears now do."""
        return use_gemv(self)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """wq|wk|wv and w1|w3 as one matmul each (inference only; after ``merge_lora`` when the model has LoRA).

        Same outputs to rounding, 3 fewer matmul calls per block: a decode step at small sizes is bound by the
        number of calls, not by bytes. Do it after moving the model (``.to`` would copy wv apart from the fused
        weight it is a view of).
        """
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()


def init_weights(model: Transformer, generator: torch.Generator | None = None, *, nonzero: float = 0.0) -> None:
    """Random LLaMA-style init for tiny test / toy models: N(0, 1/fan_in) matrices, N(0, 0.5^2) embeddings.

    Gates, biases and LoRA B start at zero as in the reference; ``nonzero > 0`` draws them from N(0, nonzero^2)
    instead, so that every path contributes (tests).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            zero_init = name.endswith(("bias", "gate.scale")) or "_l2." in name
            if p.ndim == 1 and name.endswith(".weight"):  # norms
                p.fill_(1.0)
            elif zero_init and nonzero == 0.0:
                p.zero_()
            elif zero_init:
                p.normal_(0.0, nonzero, generator=generator)
            elif "tok_embeddings" in name:
                p.normal_(0.0, 0.5, generator=generator)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=generator)
