"""The fast decode path for in-process PyTorch (gpt-fast's technique, written for HF models).

Plain ``generate`` spends most of a GPU decode step in Python: it re-plans the cache, builds position ids and
a causal mask, checks stopping criteria (one host sync per token) and launches hundreds of small kernels one
by one. Here, for greedy decoding of exactly ``output_len`` tokens:

- **A native step for Llama-like models** (Llama, Mistral, Qwen2 layouts of plain ``nn.Linear``): written over
  the model's own weights, with no HF forward, mask, position ids or cache object. Q/K/V and gate/up are
  fused, so a layer reads its weights in four matrix-vector products instead of seven; the HF weights become
  views into the fused matrices (no second copy) until ``close`` gives them their own storage back. RoPE's
  cos/sin come once from the model's own rotary module. One-token attention is a multiply-and-reduce over the
  static cache that Inductor fuses into a couple of kernels, K/V heads shared by their query group in place.
  Any other model (or one with modelopt quantizers, hooks, sliding windows) runs its own forward over a
  ``StaticCache``: slower, always correct.
- A static KV cache of exactly ``input_len + output_len`` (rounded up to 16): attention reads no empty slots
  beyond it. An eager prefill, then a step that feeds its own argmax back: next input, position and output,
  all on the device.
- On CUDA the step is compiled (fullgraph) with Inductor's max-autotune and coordinate-descent tuning (every
  batch-1 matrix-vector product becomes a Triton reduction tuned for bandwidth) and captured once in a CUDA
  graph: a token is one ``graph.replay()``, no host work or sync; tokens reach the host when the request ends.
  Inductor's global flags are set only inside ``inductor_flags`` while compiling, then restored.
- **Regional compilation** (the default, ``regional=True``): one decoder layer compiled once and called for
  every layer (plus a compiled prologue and head), so Dynamo traces and Inductor tunes one layer, not all; the
  graph still holds the whole step. On an H100 (8B shape, bf16, two calls on one machine at f6f4bf6) it
  compiled cold in 25-29 s against 61-68 s for the whole step (``regional=False``) and decoded 172.8-173.3
  tokens/s against 168.0-172.9 (benchmarks/results/cold_start_h100.log).
- **A persistent compile cache** (``use_compile_cache``): Inductor's FX-graph, autotuning and Triton caches
  under ``$GB10EXP_CACHE/compile/<GPU, torch, Triton, CUDA>``: a shape compiled before is loaded, not tuned.
- **Programmatic Dependent Launch** (PDL_FLAGS says why): ``pdl="auto"`` on Hopper or newer looks the decision
  up (``remembered_pdl``: this machine's earlier trial, else PDL_MEASURED); only where neither knows is the
  step compiled both ways, the faster graph kept and the decision stored for every later process.

Timing needs no sync per token: the first token is stamped after a device sync (a server must have it on the
host to send it), later ones by CUDA events recorded after each replay, read when the request is over.
Compilation and capture happen in ``warm``, reported as ``compile_s`` (with ``compile_stats``), never as
decode time. ``record_logits=True`` keeps each token's logits (``decode_logits``) to check the step against
the reference model; a timed decoder never has it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gb10exp import hardware
from gb10exp.backends.hf.config import is_choice
from gb10exp.bench import Timing, now
from gb10exp.utils import cache_dir, safe_name

# Inductor settings of each compile preset, passed to ``torch.compile`` (scoped to that compile) and set
# globally only inside ``inductor_flags`` while compiling. Coordinate descent makes Inductor decompose every
# batch-1 matrix-vector product into a Triton reduction and search its block sizes; max_autotune widens the
# configurations benchmarked for each before that search. On an H200 (Llama-3.1-8B shape, bf16) coordinate
# descent alone gave 65% of the copy bound, with max_autotune 77% (commit 001d3be; hf_decode_h200.json in git
# history). "plain": Inductor's defaults (cuBLAS for every matrix product), for comparison. A wider coordinate
# search (all directions, radius 2) did not finish compiling in 8 minutes on an H100 and was dropped.
PRESETS: dict[str, dict[str, object]] = {
    "plain": {},
    "default": {"max_autotune": True, "coordinate_descent_tuning": True},
}
PRESETS["tuned"] = PRESETS["default"]  # kept so that backend.options.tuned=true still runs: same compile
# Cold-start candidates (issue 19: coordinate descent compiles each configuration it tries in the main
# process, one after another). "autotune": max_autotune's few candidates per kernel, compiled in parallel and
# benchmarked once, no coordinate descent; "untuned": Inductor's heuristic block sizes, nothing benchmarked.
# Without coordinate descent Inductor leaves a batch-1 matmul to cuBLAS, so for these the native step writes
# it as the multiply-and-sum Inductor's own decomposition makes of it (MATVEC_AS_REDUCTION).
PRESETS["autotune"] = {"max_autotune": True}
PRESETS["untuned"] = {}
MATVEC_AS_REDUCTION = frozenset({"autotune", "untuned"})
# Programmatic Dependent Launch (Hopper and newer; Inductor ships it off): each kernel is launched while the
# one before it drains and waits on the device only before reading that kernel's output, hiding part of the
# fixed cost of each of the ~355 kernels of a step. What it gives depends on the GPU, the machine and the
# block sizes each cold compile autotunes (PDL_MEASURED), so ``pdl="auto"`` uses a remembered decision and
# only where there is none compiles both, times a few graph replays of each, keeps the faster and remembers
# it. A dot in a key names an Inductor sub-config.
PDL_FLAGS: dict[str, object] = {"triton.enable_pdl": True}
# (GPU name pattern, torch major.minor) -> PDL on?, measured side by side by pdl=auto's trial on the 8B shape
# (benchmarks/results/, torch 2.11, Triton 3.6): a fresh machine of a known kind compiles once, not twice.
# H100 80GB HBM3: off in 4 of 6 processes, 0 to -3% (6.11-6.14 ms/step off vs 6.26-6.29 on where off won;
# hf_decode_auto_h100*.json). H200: on, +2% (227.0 vs 222.5 tokens/s, hf_decode_auto_vs_forced_h200.json) and
# +9% (228.8 vs 209.3, hf_decode_h200.json). Any other GPU or torch: the first process trials both and stores
# the result under $GB10EXP_CACHE/pdl.
PDL_MEASURED: dict[tuple[str, str], bool] = {("H100", "2.11"): False, ("H200", "2.11"): True}
PDL_TRIAL_STEPS = 32  # graph replays per trial round (three rounds, alternating, the fastest counts)
WARM_STEPS = 3  # decode steps run to compile and autotune before the graph is captured
LLAMA_LIKE = ("llama", "mistral", "qwen2")  # same block: RMSNorm, RoPE (rotate-half), GQA, gated MLP


def software_key(device: torch.device) -> str:
    """What compiled code and tuning results depend on, as one path component: the device's name and the
    torch, Triton and CUDA versions (Inductor keys each entry by graph, shapes and flags within it)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # CPU builds of torch come without Triton
        triton_version = "none"
    return safe_name(
        f"{hardware.name(device)}-torch{torch.__version__}-triton{triton_version}-cuda{torch.version.cuda}"
    )


def use_compile_cache(device: torch.device) -> str:
    """Point Inductor's on-disk caches (FX graphs, autotuning results, Triton kernels) at
    ``$GB10EXP_CACHE/compile/<software_key>`` and return that folder. A cache folder the user chose
    (TORCHINDUCTOR_CACHE_DIR set to anything but Inductor's default under /tmp) is kept as it is.
    Inductor reads both variables at each compile and passes them to its compile workers, so setting them
    before the first compile of a decoder is enough."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    folder = cache_dir("compile", software_key(device))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    return str(folder)


def _pdl_memory(device: torch.device) -> Path:
    return cache_dir("pdl") / f"{software_key(device)}.json"


def remembered_pdl(device: torch.device) -> tuple[bool, str] | None:
    """(PDL on?, where the decision comes from) for this GPU and software, or None where nothing is known:
    this machine's own earlier trial first, then PDL_MEASURED."""
    memory = _pdl_memory(device)
    if memory.exists():
        try:
            record = json.loads(memory.read_text())
            return bool(record["pdl"]), f"trial of {record['when']} ({memory})"
        except (OSError, ValueError, KeyError):
            pass  # a damaged record is as good as none: trial again and rewrite it
    name, version = hardware.name(device), ".".join(torch.__version__.split(".")[:2])
    for (pattern, torch_version), on in PDL_MEASURED.items():
        if pattern.lower() in name.lower() and torch_version == version:
            return on, f"PDL_MEASURED[{pattern}, torch {torch_version}]"
    return None


def remember_pdl(device: torch.device, on: bool, trials: dict[bool, float]) -> None:
    """Store a trial's outcome for every later process on this GPU and software (written whole, then
    renamed: two processes racing leave one complete record)."""
    memory = _pdl_memory(device)
    record = {
        "pdl": on,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "software": software_key(device),
        "ms_per_step": {("on" if k else "off"): v * 1e3 for k, v in trials.items()},
    }
    tmp = memory.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, memory)


def _compile_counters() -> tuple[dict[str, float], dict[str, int]]:
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {k: sum(v) for k, v in compilation_time_metrics.items()}, dict(counters["inductor"])


@contextlib.contextmanager
def inductor_flags(flags: dict[str, object]) -> Iterator[None]:
    """Set Inductor's global config ``flags`` for the block and restore every one of them after it,
    also on error: a tuned compile must not change how later jobs in the same process compile."""
    if not flags:
        yield
        return
    import torch._inductor.config as inductor

    saved = {name: getattr(inductor, name) for name in flags}
    try:
        for name, value in flags.items():
            setattr(inductor, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(inductor, name, value)


class TokenStamper:
    """A ``generate()`` streamer that stamps the arrival of every generated token (not the prompt).
    ``generate`` syncs with the host per token anyway; the device sync makes the stamp exact."""

    def __init__(self, timing: Timing, device: torch.device):
        self.timing, self.device, self.prompt_seen = timing, device, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt itself
            self.prompt_seen = True
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timing.token_times.append(now())

    def end(self) -> None:
        pass


def _round_up(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


def native_unsupported(model: torch.nn.Module, max_len: int) -> str | None:
    """Why the native Llama-like step cannot run this model (None when it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in LLAMA_LIKE:
        return f"model_type {kind!r} is not one of {list(LLAMA_LIKE)}"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or any(not hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        return "not the <Model>.model.{embed_tokens,layers,norm,rotary_emb} + lm_head layout"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and max_len > window:
        return f"sliding window {window} < {max_len} positions"
    linears = [model.lm_head]
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or any(not hasattr(attn, n) for n in names):
            return "a layer without self_attn.{q,k,v,o}_proj / mlp"
        if any(not hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "an MLP without gate_proj/up_proj/down_proj/act_fn"
        # Extra normalisations (Qwen3's q_norm/k_norm, Gemma's sandwich norms) change the block.
        extra = {n for n, _ in attn.named_children()} - set(names)
        extra |= {n for n, _ in layer.named_children()} - {
            "self_attn",
            "mlp",
            "input_layernorm",
            "post_attention_layernorm",
        }
        if extra:
            return f"layer has extra modules {sorted(extra)}"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or not type(norm).__name__.endswith("RMSNorm"):
                return f"{type(norm).__name__} is not a Llama RMSNorm"
        linears += [getattr(attn, n) for n in names] + [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    # One compiled layer serves every layer (regional compilation): they must share its constants.
    first = inner.layers[0]
    for layer in inner.layers:
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(n.variance_epsilon != first.input_layernorm.variance_epsilon for n in norms):
            return "RMSNorm epsilons differ between layers"
        if type(layer.mlp.act_fn) is not type(first.mlp.act_fn) or list(layer.mlp.act_fn.parameters()):
            return "activations differ between layers (or have weights)"
    for module in linears:
        # modelopt's QuantLinear and friends subclass nn.Linear: their forward must run, not a bare matmul.
        if type(module) is not torch.nn.Linear:
            return f"{type(module).__name__} layers (quantized or wrapped) need their own forward"
        if module._forward_hooks or module._forward_pre_hooks:
            return "forward hooks on linear layers"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return f"parameters on {sorted(map(str, devices))}: one real device needed"
    return None


@dataclass
class _Layer:
    """One layer's tensors, in the order ``_NativeLlama.layer_step`` takes them."""

    ln1: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ln2: torch.Tensor
    wgu: torch.Tensor
    bgu: torch.Tensor | None
    wdown: torch.Tensor
    bdown: torch.Tensor | None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (
            self.ln1,
            self.wqkv,
            self.bqkv,
            self.wo,
            self.bo,
            self.ln2,
            self.wgu,
            self.bgu,
            self.wdown,
            self.bdown,
        )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Exactly the HF Llama RMSNorm: statistics in float32, scale applied in the model's dtype.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _NativeLlama:
    """The decode-time computation of a Llama-like HF model over its own (fused) weights and a static
    cache it owns, in three parts that compile separately: ``embed_step`` (token and RoPE lookups, the
    causal mask), ``layer_step`` (one decoder layer; its weights and cache are arguments, so one compiled
    layer serves them all) and ``head_logits``. ``forward`` runs them eagerly (prefill, the CPU)."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_len: int):
        config, inner = model.config, model.model
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        attn0 = inner.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn0.q_proj.out_features // self.heads
        self.scale = float(getattr(attn0, "scaling", self.head_dim**-0.5))
        self.dtype = dtype
        self.matvec_as_reduction = False  # FastDecoder sets it for a compiled step of MATVEC_AS_REDUCTION
        # Shared by every layer (native_unsupported checks that they agree).
        self.eps = float(inner.layers[0].input_layernorm.variance_epsilon)
        self.act = inner.layers[0].mlp.act_fn
        self._views: list[torch.nn.Parameter] = []  # HF parameters that now view a fused matrix
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            wqkv, bqkv = self._fuse([a.q_proj, a.k_proj, a.v_proj])
            wgu, bgu = self._fuse([m.gate_proj, m.up_proj])
            self.layers.append(
                _Layer(
                    layer.input_layernorm.weight,
                    wqkv,
                    bqkv,
                    a.o_proj.weight,
                    a.o_proj.bias,
                    layer.post_attention_layernorm.weight,
                    wgu,
                    bgu,
                    m.down_proj.weight,
                    m.down_proj.bias,
                )
            )
        self.split_qkv = [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
        self.intermediate = inner.layers[0].mlp.gate_proj.out_features
        self.embed = inner.embed_tokens.weight
        self.norm, self.norm_eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        self.head, self.head_bias = model.lm_head.weight, model.lm_head.bias
        # RoPE tables from the model's own rotary module (so its scaling variant, e.g. Llama 3's, holds),
        # in the model's dtype as HF applies them.
        positions = torch.arange(max_len, device=device)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=dtype, device=device), positions)
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)
        self.key_pos = torch.arange(max_len, device=device)
        # K and V of a layer in one tensor, written by one indexed copy (one kernel, not two, per layer);
        # one tensor per layer, not one for all: an in-place write into a slice of a bigger input can
        # make the compiled graph copy the whole buffer back; into a whole tensor it stays in place.
        shape = (2, batch_size, self.kv_heads, max_len, self.head_dim)
        self.kv_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]

    def _fuse(self, linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One matrix for several projections of the same input; each HF weight becomes a view of it,
        so the model keeps working and no weight is stored twice."""
        fused = torch.cat([lin.weight.data for lin in linears])
        bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat(
                [
                    lin.bias.data
                    if lin.bias is not None
                    else torch.zeros(lin.out_features, dtype=fused.dtype, device=fused.device)
                    for lin in linears
                ]
            )
        offset = 0
        for lin in linears:
            n = lin.out_features
            lin.weight.data = fused[offset : offset + n]
            self._views.append(lin.weight)
            if bias is not None and lin.bias is not None:
                lin.bias.data = bias[offset : offset + n]
                self._views.append(lin.bias)
            offset += n
        return fused, bias

    def release(self) -> None:
        """Give every HF weight its own storage again (a view-sharing model would confuse savers that
        look for tied tensors), then drop the fused matrices and the cache."""
        for param in self._views:
            param.data = param.data.clone()
        self._views.clear()
        self.layers.clear()
        self.kv_cache = []

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D) against one layer's cache kv (2, B, Hkv, L, D); mask (T, L) says which keys
        each query sees."""
        k, v = kv
        b, _, t, d = q.shape
        if t > 1:  # prefill: the library kernel, query groups sharing K/V heads without a copy
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask[None, None], scale=self.scale, enable_gqa=self.kv_heads != self.heads
            )
            return out.transpose(1, 2).reshape(b, t, self.heads * d)
        # One query token: scores and the weighted sum as multiply-and-reduce in float32, which Inductor
        # fuses (a cuBLAS batched GEMM with 4 query rows per K/V head would be two launches per layer).
        group = self.heads // self.kv_heads
        qg = q.reshape(b, self.kv_heads, group, 1, d).float()
        scores = (qg * k[:, :, None].float()).sum(-1) * self.scale  # (B, Hkv, G, L)
        scores = scores.masked_fill(~mask[0], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # (B, Hkv, G, D)
        return out.to(q.dtype).reshape(b, 1, self.heads * d)

    def _linear(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``F.linear``; for one token, where asked, as the multiply-and-sum Inductor makes of a batch-1
        matmul under coordinate descent (torch/_inductor/decomposition.py, mm/addmm): products and sum in
        float32, one rounding to the model's dtype, which Inductor lowers to a Triton reduction."""
        if not self.matvec_as_reduction or h.shape[0] * h.shape[1] != 1:
            return F.linear(h, w, b)
        out = (h.float().unsqueeze(-2) * w.float()).sum(-1)
        if b is not None:
            out = out + b.float()
        return out.to(h.dtype)

    def embed_step(
        self, ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token embeddings, the RoPE rows of ``positions`` (T, D; broadcast over batch and heads) and
        the causal mask over the static cache (T, L)."""
        x = F.embedding(ids, self.embed)
        return x, self.cos[positions], self.sin[positions], self.key_pos[None, :] <= positions[:, None]

    def layer_step(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        kv: torch.Tensor,
        ln1: torch.Tensor,
        wqkv: torch.Tensor,
        bqkv: torch.Tensor | None,
        wo: torch.Tensor,
        bo: torch.Tensor | None,
        ln2: torch.Tensor,
        wgu: torch.Tensor,
        bgu: torch.Tensor | None,
        wdown: torch.Tensor,
        bdown: torch.Tensor | None,
    ) -> torch.Tensor:
        """One decoder layer: writes this layer's K/V at ``positions`` into ``kv`` and returns the
        residual stream after the layer. Everything that differs between layers is an argument."""
        b, t, _ = x.shape
        h = _rms_norm(x, ln1, self.eps)
        q, k, v = self._linear(h, wqkv, bqkv).split(self.split_qkv, dim=-1)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kv.index_copy_(3, positions, torch.stack((k, v)))
        x = x + self._linear(self._attend(q, kv, mask), wo, bo)
        h = _rms_norm(x, ln2, self.eps)
        gate, up = self._linear(h, wgu, bgu).split(self.intermediate, dim=-1)
        return x + self._linear(self.act(gate) * up, wdown, bdown)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The next-token logits (B, V) of the last position, in the model's dtype."""
        x = _rms_norm(x[:, -1:], self.norm, self.norm_eps)
        return self._linear(x, self.head, self.head_bias)[:, -1]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Eagerly: writes K/V at ``positions`` and returns the last position's logits (B, V)."""
        x, cos, sin, mask = self.embed_step(ids, positions)
        for layer, kv in zip(self.layers, self.kv_cache, strict=True):
            x = self.layer_step(x, cos, sin, mask, positions, kv, *layer.tensors())
        return self.head_logits(x)


def _compiled(fn: Callable, owner: object, flags: dict[str, object]) -> Callable:
    """``torch.compile`` of ``fn`` bound to ``owner``, on a copy of its code object. Dynamo keeps its cache,
    and its limit of 8 entries (an error with fullgraph=True), on the code object, so decoders sharing one
    would run out after a few models in a long sweep; this way the entries live and die with the decoder."""
    own = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    return torch.compile(types.MethodType(own, owner), fullgraph=True, options=dict(flags))


class FastDecoder:
    """Greedy decoding of exactly ``output_len`` tokens for prompts of ``input_len`` tokens.

    ``preset``: a ``PRESETS`` name (``tuned``, kept for old configs, compiles as the default does). ``pdl``:
    on, off, or "auto" (see the module docstring; off where it cannot act: no compiled, tuned step on a Hopper
    or newer GPU). ``native=False`` forces the HF-forward step; ``regional`` (default) compiles the native step
    by layer (under half the cold compile, the same speed), ``regional=False`` as one graph; ``record_logits``: for ``decode_logits``. Use as a context
    manager, or call ``close``: the native step shares the model's weights until then."""

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        input_len: int,
        output_len: int,
        compile_step: bool,
        cuda_graph: bool,
        tuned: bool = False,
        preset: str | None = None,
        native: bool = True,
        pdl: str | bool = "auto",
        record_logits: bool = False,
        regional: bool = True,
    ):
        self.model, self.input_len, self.output_len = model, input_len, output_len
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.use_graph = cuda_graph and self.cuda
        self.preset = preset or ("tuned" if tuned else "default")
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
        if not is_choice(pdl):
            raise ValueError(f"pdl={pdl!r} is not one of auto, true, false")
        self.compiled = compile_step
        self.record_logits = record_logits
        self.regional = regional
        # Before anything compiles: a process that finds this GPU's and software's cache skips the tuning.
        self.compile_cache = use_compile_cache(self.device) if compile_step else None
        self.compile_stats: dict[str, object] = {}
        self.pdl_note = self._pdl_unusable()
        self.pdl_source: str | None = None  # where pdl=auto's decision came from, when it was not trialled
        base = PRESETS[self.preset]
        if self.pdl_note is not None or pdl is False:
            self.candidates = {False: base}
        elif pdl is True:
            self.candidates = {True: base | PDL_FLAGS}
        elif output_len < 2:  # a one-token request has no decode step: nothing to time, nothing to gain
            self.pdl_note = "auto, and a one-token request has no decode step to time"
            self.candidates = {False: base}
        elif (known := remembered_pdl(self.device)) is not None:
            on, self.pdl_source = known
            self.candidates = {on: base | PDL_FLAGS if on else base}
        else:  # measured in warm() and remembered: it helps one Hopper GPU and hurts another (PDL_FLAGS)
            self.candidates = {False: base, True: base | PDL_FLAGS}
        self.trials: dict[bool, float] = {}  # seconds per step of each candidate timed in warm()
        self.pdl_failed: str | None = None  # why the PDL candidate of "auto" could not be built
        # Room for the warm-up steps too: they run before a request and must stay inside the cache.
        max_len = _round_up(input_len + max(output_len, WARM_STEPS + 1))
        why = native_unsupported(model, max_len) if native else "native step switched off"
        self.method = "native Llama step" if why is None else f"HF forward ({why})"
        self.native = _NativeLlama(model, batch_size, max_len) if why is None else None
        if self.native is not None:
            self.native.matvec_as_reduction = compile_step and self.preset in MATVEC_AS_REDUCTION
        if self.native is None:
            from transformers import StaticCache

            self.cache = StaticCache(config=model.config, max_cache_len=max_len)
            # The forward's keywords moved between transformers 5.x releases: cache_position went away
            # (the cache tracks positions itself) and past_key_values became cache.
            params = inspect.signature(model.forward).parameters
            self.takes_cache_position = "cache_position" in params
            self.cache_kw = "past_key_values" if "past_key_values" in params else "cache"
        # Device-side state of the decode loop; fixed addresses, so a CUDA graph can own them.
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.seq = torch.zeros(batch_size, max_len, dtype=torch.long, device=self.device)
        if record_logits:  # float32: the model's bf16 logits fit exactly
            vocab = model.get_output_embeddings().weight.shape[0]
            self.logits = torch.zeros(batch_size, vocab, dtype=torch.float32, device=self.device)
        self.prefill_positions = torch.arange(input_len, device=self.device)
        self._step_fns: dict[bool, Callable[[], None]] = {}  # one step per PDL candidate, made once
        self._use(next(iter(self.candidates)), None)  # sets pdl, flags, step_fn, graph; warm() settles them
        self.compile_s = 0.0

    def _pdl_unusable(self) -> str | None:
        """Why PDL is not tried here (None when it is): only a tuned compile on a GPU that has it tries it."""
        if not self.compiled or self.preset == "plain":
            return "no tuned compile"
        if not self.cuda:
            return f"not on {self.device.type}"
        if not hardware.at_least(self.device, "hopper"):
            return "GPU older than Hopper"
        import torch._inductor.config as inductor

        if not hasattr(inductor.triton, "enable_pdl"):
            return f"torch {torch.__version__} has no triton.enable_pdl"
        return None

    def _step_for(self, pdl: bool) -> Callable[[], None]:
        """The step of one PDL candidate, made once: eager, compiled whole (one graph: Inductor fuses across
        layer boundaries) or, native and ``regional``, by regions (``_regional_step``)."""
        if pdl not in self._step_fns:
            flags = self.candidates[pdl]
            if not self.compiled:
                self._step_fns[pdl] = self._step
            elif self.native is not None and self.regional:
                self._step_fns[pdl] = self._regional_step(flags)
            else:
                self._step_fns[pdl] = _compiled(FastDecoder._step, self, flags)
        return self._step_fns[pdl]

    def _regional_step(self, flags: dict[str, object]) -> Callable[[], None]:
        """The native step from three compiled parts, one layer traced and tuned instead of all (the CUDA
        graph still holds the whole step); weights and caches are arguments, so all layers share one graph."""
        native = self.native
        embed = _compiled(_NativeLlama.embed_step, native, flags)
        layer = _compiled(_NativeLlama.layer_step, native, flags)
        finish = _compiled(FastDecoder._finish, self, flags)
        weights = [(kv, *layer_.tensors()) for kv, layer_ in zip(native.kv_cache, native.layers, strict=True)]

        def step() -> None:
            x, cos, sin, mask = embed(self.tok, self.pos)
            for kv, *w in weights:
                x = layer(x, cos, sin, mask, self.pos, kv, *w)
            finish(x)

        step.parts = (embed, layer, finish)
        return step

    def describe(self) -> str:
        compiled = f"compiled step ({self.preset}{', by layer' if self.regional and self.native else ''})"
        if not self.compiled:
            compiled = "eager step"
        if self.pdl_note is not None:
            pdl = f"PDL n/a: {self.pdl_note}"
        elif self.pdl_failed is not None:
            pdl = f"PDL off (the PDL compile failed: {self.pdl_failed})"
        elif self.trials:
            timed = ", ".join(f"{'on' if k else 'off'} {v * 1e3:.2f} ms/step" for k, v in self.trials.items())
            pdl = f"PDL {'on' if self.pdl else 'off'} (faster of {timed}; remembered)"
        elif self.pdl_source is not None:
            pdl = f"PDL {'on' if self.pdl else 'off'} (remembered: {self.pdl_source})"
        else:
            pdl = f"PDL {'on' if self.pdl else 'off'}"
        graph = "CUDA graph" if self.graph is not None else "no graph"
        return f"{self.method}, static cache, {compiled}, {pdl}, {graph}"

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The last position's logits (B, V), K/V written at ``positions``."""
        if self.native is not None:
            return self.native.forward(ids, positions)
        extra = {"cache_position": positions} if self.takes_cache_position else {}
        extra[self.cache_kw] = self.cache
        logits = self.model(
            input_ids=ids,
            position_ids=positions.unsqueeze(0).expand(ids.shape[0], -1),
            use_cache=True,
            logits_to_keep=1,
            **extra,
        ).logits
        return logits[:, -1]

    def _advance(self, logits: torch.Tensor) -> None:
        """Feed the greedy token back: next input, next position, appended to the output."""
        nxt = logits.argmax(-1, keepdim=True)
        if self.record_logits:
            self.logits.copy_(logits)
        self.pos.add_(1)
        self.seq.index_copy_(1, self.pos, nxt)
        self.tok.copy_(nxt)

    def _step(self) -> None:
        self._advance(self._logits(self.tok, self.pos))

    def _finish(self, x: torch.Tensor) -> None:
        self._advance(self.native.head_logits(x))

    def _prefill(self, prompt: torch.Tensor) -> None:
        if self.native is None:
            self.cache.reset()
        # The native cache needs no reset: the causal mask hides every slot past the current position, and
        # each earlier slot is rewritten by this request before it is read.
        logits = self._logits(prompt, self.prefill_positions)
        first = logits.argmax(-1, keepdim=True)
        if self.record_logits:
            self.logits.copy_(logits)
        self.tok.copy_(first)
        self.pos.fill_(self.input_len)
        self.seq[:, self.input_len : self.input_len + 1].copy_(first)

    def _run_step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step_fn()

    @torch.no_grad()
    def warm(self, prompt: torch.Tensor) -> float:
        """Compile and capture (once); with two PDL candidates, both, timed in alternating rounds, the
        faster kept (and remembered for later processes) and the other freed. Returns the seconds it
        took, never counted as decode time; ``compile_stats`` says what the caches gave."""
        start = time.perf_counter()
        before = _compile_counters() if self.compiled else None
        graphs: dict[bool, torch.cuda.CUDAGraph | None] = {}  # of each candidate built
        for pdl in self.candidates:
            self._use(pdl, None)
            try:
                self._compile_and_capture(prompt)
            except Exception as exc:
                if not (pdl and len(self.candidates) > 1):
                    raise
                # "auto" must never be worse than PDL off: a GPU or Triton that cannot build it keeps that.
                self.pdl_failed = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            graphs[pdl] = self.graph
        if len(graphs) > 1:
            self.trials = {pdl: float("inf") for pdl in graphs}
            for _ in range(3):  # alternating, so drift in clocks or temperature weighs on both alike
                for pdl, graph in graphs.items():
                    self._use(pdl, graph)
                    self.trials[pdl] = min(self.trials[pdl], self._seconds_per_step(prompt))
        chosen = min(graphs, key=lambda pdl: self.trials.get(pdl, 0.0))  # a tie keeps the first, PDL off
        if self.trials:
            remember_pdl(self.device, chosen, self.trials)
        self._use(chosen, graphs[chosen])
        graphs.clear()  # the other graph goes with it
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.compile_s = time.perf_counter() - start
        if before is not None:
            self.compile_stats = self._compile_delta(before)
        return self.compile_s

    def _compile_delta(self, before: tuple[dict[str, float], dict[str, int]]) -> dict[str, object]:
        """What warm() cost in Dynamo's and Inductor's own terms: FX-graph cache hits and misses, kernel
        configurations benchmarked by coordinate descent, and the longest timed phases (they nest)."""
        times, counts = _compile_counters()
        stats: dict[str, object] = {"cache_dir": self.compile_cache}
        for key in ("fxgraph_cache_hit", "fxgraph_cache_miss", "coordesc_tuning_bench"):
            stats[key] = counts.get(key, 0) - before[1].get(key, 0)
        spent = {k: v - before[0].get(k, 0.0) for k, v in times.items()}
        stats["phase_s"] = {
            k: round(v, 1) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])[:20] if v >= 0.2
        }
        return stats

    def _use(self, pdl: bool, graph: torch.cuda.CUDAGraph | None) -> None:
        """Make candidate ``pdl`` (and its captured graph, if any) the one that runs."""
        self.pdl, self.flags, self.step_fn, self.graph = pdl, self.candidates[pdl], self._step_for(pdl), graph

    def _compile_and_capture(self, prompt: torch.Tensor) -> None:
        with inductor_flags(self.flags):  # compilation happens lazily, in the first calls below
            self._prefill(prompt)  # allocates the cache before anything is compiled or captured
            if self.use_graph:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # compile and autotune outside the capture, as graphs require
                    for _ in range(WARM_STEPS):
                        self.step_fn()
                torch.cuda.current_stream(self.device).wait_stream(side)
                self._prefill(prompt)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.step_fn()
            else:
                for _ in range(WARM_STEPS - 1):
                    self.step_fn()

    def _step_scope(self) -> contextlib.AbstractContextManager:
        """Where the steps of a request run. Without a graph the compiled step still passes Dynamo's
        guards each call; a recompile there must see the same flags as the first compile."""
        if self.graph is None and self.compiled:
            return inductor_flags(self.flags)
        return contextlib.nullcontext()

    def _seconds_per_step(self, prompt: torch.Tensor) -> float:
        """One round of up to PDL_TRIAL_STEPS decode steps after a fresh prefill (the cache holds no more
        than the request), in seconds per step."""
        steps = min(PDL_TRIAL_STEPS, self.output_len - 1)
        with self._step_scope():
            self._prefill(prompt)
            if self.cuda:
                torch.cuda.synchronize(self.device)
            begin = time.perf_counter()
            for _ in range(steps):
                self._run_step()
            if self.cuda:
                torch.cuda.synchronize(self.device)
        return (time.perf_counter() - begin) / steps

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor) -> Timing:
        """One request: prompt (B, input_len) -> Timing of output_len tokens; tokens in ``self.tokens``."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # nothing queued from before counts against this request
        timing = Timing(start=now(), batch_size=prompt.shape[0])
        with self._step_scope():
            self._prefill(prompt)
            if self.cuda:
                torch.cuda.synchronize(self.device)
            timing.token_times.append(now())
            if not self.cuda:  # CPU work is synchronous: a host stamp per token is exact
                for _ in range(self.output_len - 1):
                    self._run_step()
                    timing.token_times.append(now())
                return timing
            first = torch.cuda.Event(enable_timing=True)
            first.record()
            events = []
            for _ in range(self.output_len - 1):
                self._run_step()
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
        torch.cuda.synchronize(self.device)
        base = timing.token_times[0]
        timing.token_times += [base + first.elapsed_time(e) / 1e3 for e in events]
        return timing

    @torch.no_grad()
    def decode_logits(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One request token by token, through the same prefill and the same compiled step (graph) as
        ``generate``, keeping each token's logits: (tokens (B, output_len), logits (B, output_len, V) in
        float32). Needs ``record_logits=True``; a check of the step, never timed."""
        if not self.record_logits:
            raise ValueError(
                "decode_logits needs FastDecoder(record_logits=True); a timed decoder has it off"
            )
        with self._step_scope():
            self._prefill(prompt)
            out = [self.logits.clone()]
            for _ in range(self.output_len - 1):
                self._run_step()
                out.append(self.logits.clone())
        return self.tokens.clone(), torch.stack(out, dim=1)

    @property
    def tokens(self) -> torch.Tensor:
        """The last request's generated tokens, (B, output_len)."""
        return self.seq[:, self.input_len : self.input_len + self.output_len]

    def close(self) -> None:
        """Free the graph and the cache, and give the model's weights their own storage back."""
        self.graph = None
        if self.native is not None:
            self.native.release()
            self.native = None

    def __enter__(self) -> FastDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
