"""The fast decode path for in-process PyTorch (the gpt-fast technique).

Plain ``generate`` spends most of a decode step in Python on a GPU: it re-plans the cache, checks
stopping criteria (one host sync per token) and launches hundreds of small kernels one by one. Here:

- a ``StaticCache`` sized to exactly ``input_len + output_len`` (attention never reads empty slots
  beyond it, which a cache sized to the model's 128k context would do at every step);
- an eager prefill, then a decode step that feeds its own argmax back: the step writes the next token
  into its input buffer, advances its position tensor and appends to the output, all on the device;
- on CUDA that step is compiled (``torch.compile``, fused kernels) and captured once in a CUDA graph,
  so each token costs one ``graph.replay()`` and no host work at all; the greedy tokens never come back
  to the host until the request ends.

Timing stays honest without a sync per token: the first token is stamped after a device sync (a server
must have it on the host to send it), later tokens by CUDA events recorded after each replay and read
when the request is over. Compilation and capture happen in ``warm`` and are reported as ``compile_s``.
"""

from __future__ import annotations

import inspect
import time

import torch

from gb10exp.bench import Timing, now


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


class FastDecoder:
    """Greedy decoding of exactly ``output_len`` tokens for prompts of ``input_len`` tokens."""

    def __init__(self, model: torch.nn.Module, batch_size: int, input_len: int, output_len: int,
                 compile_step: bool, cuda_graph: bool, tuned: bool = False):
        from transformers import StaticCache

        self.model, self.input_len, self.output_len = model, input_len, output_len
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.use_graph = cuda_graph and self.cuda
        max_len = _round_up(input_len + output_len)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        # Device-side state of the decode loop; fixed addresses, so a CUDA graph can own them.
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.seq = torch.zeros(batch_size, max_len, dtype=torch.long, device=self.device)
        self.prefill_positions = torch.arange(input_len, device=self.device)
        # The forward's keywords moved between transformers 5.x releases: cache_position went away (the
        # cache tracks positions itself) and past_key_values became cache.
        params = inspect.signature(model.forward).parameters
        self.takes_cache_position = "cache_position" in params
        self.cache_kw = "past_key_values" if "past_key_values" in params else "cache"
        self.step_fn = self._compile(tuned) if compile_step else self._step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.compile_s = 0.0

    def _compile(self, tuned: bool):
        """tuned: Inductor autotunes the matrix-vector kernels and searches block sizes (as gpt-fast
        does); decode at batch 1 is bandwidth-bound GEMVs, where that buys the last 10-15%. Slower to
        compile (reported in compile_s)."""
        if not tuned:
            return torch.compile(self._step, fullgraph=True)
        import torch._inductor.config as inductor

        inductor.coordinate_descent_tuning = True
        return torch.compile(self._step, fullgraph=True, mode="max-autotune-no-cudagraphs")

    def _next_token(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        extra = {"cache_position": positions} if self.takes_cache_position else {}
        extra[self.cache_kw] = self.cache
        logits = self.model(input_ids=ids, position_ids=positions.unsqueeze(0).expand(ids.shape[0], -1),
                            use_cache=True, logits_to_keep=1, **extra).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def _step(self) -> None:
        nxt = self._next_token(self.tok, self.pos)
        self.pos.add_(1)
        self.seq.index_copy_(1, self.pos, nxt)
        self.tok.copy_(nxt)

    def _prefill(self, prompt: torch.Tensor) -> None:
        self.cache.reset()
        first = self._next_token(prompt, self.prefill_positions)
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
        """Compile and capture (once); returns the seconds it took, never counted as decode time."""
        start = time.perf_counter()
        self._prefill(prompt)  # allocates the cache before anything is compiled or captured
        if self.use_graph:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # compile and autotune outside the capture, as CUDA graphs require
                for _ in range(3):
                    self.step_fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._prefill(prompt)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step_fn()
        else:
            for _ in range(2):
                self.step_fn()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.compile_s = time.perf_counter() - start
        return self.compile_s

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor) -> Timing:
        """One request: prompt (B, input_len) -> Timing of output_len tokens; tokens in ``self.tokens``."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # nothing queued from before counts against this request
        timing = Timing(start=now(), batch_size=prompt.shape[0])
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

    @property
    def tokens(self) -> torch.Tensor:
        """The last request's generated tokens, (B, output_len)."""
        return self.seq[:, self.input_len : self.input_len + self.output_len]
