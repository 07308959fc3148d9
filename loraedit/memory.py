"""Memory modes of the denoiser: how its weights are stored and how a training step holds its activations.

A mode is four independent choices (MemoryMode):
  weights       storage dtype of the frozen base weights: fp32, bf16, or fp8 (float8 storage,
                cast per layer to bf16 for compute by diffusers' layerwise casting)
  checkpointing keep only each block's input during forward, recompute the block in backward
  offload       keep those block inputs in (pinned) host memory instead of on the GPU
  swap          keep the frozen base weights of the last `swap` blocks in (pinned) host memory and
                stream each in just before use, one block ahead on a side stream, in forward order
                for forward and in reverse order for backward (musubi-tuner's block swap, done with
                our own checkpoint function so the backward order is known exactly)

Mode names: fp32, bf16, fp8, bf16-offload, fp8-offload, bf16-swapN, fp8-swapN (N blocks swapped;
swap implies checkpointing and offload). On the CPU offload and swap run as CPU-to-CPU copies, so
the tests exercise exactly the code a GPU runs.

Why not diffusers' group offload: its hooks are not safe for training (the checkpoint's early stop
skips the offload hook, so every block ends up resident by the end of backward; with streams it
writes stale pinned copies back over LoRA updates). Here only frozen weights are ever moved, and they
are never written back: an eviction is just pointing the parameter at its host copy again.

LoRA in the compute dtype: peft casts each adapted layer's input to the LoRA weights' dtype, so an
fp32 LoRA on a bf16 model keeps an fp32 copy of every adapted input for backward. The LoRA weights
used in forward/backward are therefore held in the compute dtype, and fp32 masters (what AdamW
updates, what checkpoints and the saved LoRA hold) are kept beside them (LoraMasters).
"""

from __future__ import annotations

import contextlib
import math
import re

import torch

from loraedit.plan import MemoryMode, parse_mode  # noqa: F401  (the mode names live with the memory model)

FP8 = torch.float8_e4m3fn


# Set by the memory model (loraedit.plan) while it simulates: tensors created inside `on_host()`
# count as host memory. On a GPU the device of each tensor says it; in the CPU simulation it cannot.
_host_allocation = 0


@contextlib.contextmanager
def on_host():
    global _host_allocation
    _host_allocation += 1
    try:
        yield
    finally:
        _host_allocation -= 1


# ---------------------------------------------------------------- building the transformer without a full-precision copy


def _module_device(name: str, host_blocks: set[int]) -> bool:
    m = re.match(r"blocks\.(\d+)(\.|$)", name)
    return m is not None and int(m.group(1)) in host_blocks


def build_transformer(config: dict, mode: MemoryMode, device: torch.device, tensors=None, seed: int | None = 0, cls=None):
    """The denoiser of `config`, frozen, with every tensor created once, in its final dtype and place.

    Built on the meta device, cast there (bf16 / fp8 storage decided by diffusers' own rules:
    `_keep_in_fp32_modules`, layerwise-casting skip patterns), then materialised module by module:
    the blocks that `mode.swap` keeps on the host go to (pinned) host memory, the rest straight to
    `device`. Nothing full-precision or full-size is ever built first.

    tensors: iterable of (name, tensor) (e.g. read from the safetensors files one by one); None →
    random weights from `seed` (the real cost, for benchmarks), or left uninitialised when seed is
    None (the memory model's fake tensors have no values).
    """
    if cls is None:
        from diffusers import WanTransformer3DModel as cls

    with torch.device("meta"):
        model = cls.from_config(config)
    keep32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, p in model.named_parameters():
            dtype = torch.float32 if mode.compute_dtype != torch.float32 and any(k in name.split(".") for k in keep32) else mode.compute_dtype
            p.data = p.data.to(dtype)
    if mode.weights == "fp8":
        model.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=mode.compute_dtype)
    n = len(model.blocks)
    if mode.swap > n:
        import logging

        logging.getLogger("loraedit").info("--memory %s: this model has %d blocks; all %d are swapped (as with swap%d)",
                                           mode.name, n, n, n)
    host_blocks = set(range(n - min(mode.swap, n), n))
    host = torch.device("meta" if device.type == "meta" else "cpu")  # meta: the memory model's simulation
    for name, module in model.named_modules():
        if _module_device(name, host_blocks):
            with on_host():
                _materialise(module, host)
        else:
            _materialise(module, device)
    if device.type == "cuda" and host_blocks:
        model._pinned_arena = _pin_blocks([model.blocks[i] for i in sorted(host_blocks)])
    _rebuild_buffers(model, device)
    params = dict(model.named_parameters())
    if tensors is None:
        if seed is not None:
            _random_init(params.items(), seed, device)
    else:
        missing = set(params)
        with torch.no_grad():
            for key, value in tensors:
                if key in params:
                    params[key].copy_(value)  # casts (bf16 → fp8 storage included) on the target device
                    missing.discard(key)
        if missing:
            raise ValueError(f"weights missing for {len(missing)} parameters, e.g. {sorted(missing)[0]}")
    model.requires_grad_(False)
    return model


def _pin_blocks(blocks) -> torch.Tensor:
    """Point the parameters of `blocks` into one page-locked host buffer, so copies to the GPU are async.

    One buffer registered with cudaHostRegister keeps the host cost at exactly the weights' size
    (PyTorch's pinned allocator rounds each allocation up to a power of two); if registering fails,
    the pinned allocator is used.
    """
    params = [p for b in blocks for p in b.parameters()]
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += (p.numel() * p.element_size() + 511) // 512 * 512
    arena = torch.empty(total, dtype=torch.uint8)
    try:
        err = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), total, 0)
        if int(err) != 0 or not arena.is_pinned():
            raise RuntimeError(f"cudaHostRegister: {err}")
    except Exception:  # noqa: BLE001 — fall back to PyTorch's pinned allocator
        arena = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    for p, off in zip(params, offsets):
        n = p.numel() * p.element_size()
        p.data = arena[off : off + n].view(p.dtype).view(p.shape)
    return arena


def _materialise(module, device) -> None:
    """Module.to_empty(recurse=False), written out: to_empty swaps tensors, which fake tensors refuse."""
    for name, p in module._parameters.items():
        if p is not None:
            module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
    for name, b in module._buffers.items():
        if b is not None:
            module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def _rebuild_buffers(model, device) -> None:
    """Non-persistent buffers (the RoPE tables) are computed in __init__; recompute them for real."""
    rope = getattr(model, "rope", None)
    if rope is not None:
        fresh = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
        for name, buf in fresh.named_buffers():
            setattr(rope, name, buf.float().to(device))


@torch.no_grad()
def _random_init(named_params, seed: int, device: torch.device | None = None) -> None:
    """Weights of a sane scale (N(0, 0.02); norms' scales 1; biases 0): cost is what is measured.

    Drawn on `device` (one small generator per tensor) and copied into place, so a 14B model is
    initialised in seconds on a GPU, host-resident blocks included.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in named_params:
        if p.ndim > 1:
            dev = device or p.device
            dg = torch.Generator(dev).manual_seed(int(torch.randint(2**31, (1,), generator=g)))
            tmp = torch.empty(p.shape, dtype=torch.bfloat16 if p.dtype == FP8 else p.dtype, device=dev)
            p.copy_(tmp.normal_(0, 0.02, generator=dg))
        else:
            p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)


def random_transformer(config: dict, mode: MemoryMode, device: torch.device, seed: int | None = 0, cls=None):
    return build_transformer(config, mode, device, None, seed, cls)


def safetensors_tensors(folder):
    """(name, tensor) for every tensor of a diffusers component folder, read one at a time (mmap)."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                yield key, fh.get_tensor(key)


# ---------------------------------------------------------------- LoRA in the compute dtype, fp32 masters


def reinit_lora(transformer, seed: int) -> None:
    """Every LoRA A ← kaiming-uniform (peft's default) drawn in fp32 from `seed`, every B ← 0.

    Done after any cast, so a run starts from the same LoRA whatever the memory mode (peft would
    otherwise draw A in the base layer's dtype: float8 for fp8 storage).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted((n, p) for n, p in transformer.named_parameters() if ".lora_" in n):
            if ".lora_A." in name:
                w = torch.empty(p.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
                p.copy_(w)
            else:
                p.zero_()


class LoraMasters:
    """fp32 master copies of LoRA weights that compute in a lower dtype.

    The compute copies live in the model; their gradients are moved to the masters as autograd
    accumulates them (post-accumulate-grad hooks), and the masters are copied into the model at the
    start of every forward, so whatever changed them (an optimizer step, a checkpoint load) is what
    the next step computes with. (Version counters cannot tell: fused AdamW updates in place
    without bumping them.) The copy is one foreach kernel over ~0.3 GB: well under a millisecond.
    """

    def __init__(self, transformer, names: list[str], dtype: torch.dtype):
        params = dict(transformer.named_parameters())
        self.compute = [params[n] for n in names]
        self.masters = {n: torch.nn.Parameter(params[n].detach().float().clone()) for n in names}
        with torch.no_grad():
            for p in self.compute:
                p.data = p.data.to(dtype)
        for p, m in zip(self.compute, self.masters.values()):
            p.register_post_accumulate_grad_hook(self._mover(m))
        self.sync()
        transformer.register_forward_pre_hook(lambda *_: self.sync())

    @staticmethod
    def _mover(master):
        def move(p):
            g = p.grad.float()
            master.grad = g if master.grad is None else master.grad.add_(g)
            p.grad = None

        return move

    def sync(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.compute, list(self.masters.values()))


def lora_to_compute_dtype(transformer, dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    """Put the trainable LoRA weights in `dtype` for compute, with fp32 masters; returns the masters."""
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    if dtype == torch.float32:
        with torch.no_grad():
            for n, p in transformer.named_parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        transformer._lora_masters = None
        return {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    masters = LoraMasters(transformer, names, dtype)
    transformer._lora_masters = masters
    return masters.masters


# ---------------------------------------------------------------- checkpointed blocks with offload and swap


class BlockRunner:
    """The checkpoint function of the transformer's blocks, with activation offload and block swap.

    Installed with `enable_gradient_checkpointing(gradient_checkpointing_func=runner)`; diffusers
    then calls runner(block, hidden, text, temb, rope) for each block in forward order. Forward runs
    the block without a graph and keeps its input (in host memory when offloading); backward
    re-runs it with a graph and back-propagates, block by block in reverse order. Block swap also
    works without gradients (render): forward hooks on the blocks stream the weights in.
    """

    def __init__(self, transformer, device: torch.device, offload: bool, swap: int):
        self.blocks = list(transformer.blocks)
        self.index = {id(b): i for i, b in enumerate(self.blocks)}
        self.device = device
        self.cuda = device.type == "cuda"
        self.host_device = torch.device("meta" if device.type == "meta" else "cpu")
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.offload = offload
        n = len(self.blocks)
        self.swapped = set(range(n - min(swap, n), n))
        # the host copy of each swapped block's frozen weights (what the parameter points at when evicted)
        self.host = {i: [(p, p.data) for p in self.blocks[i].parameters() if not p.requires_grad] for i in sorted(self.swapped)}
        self.ready: dict[int, torch.cuda.Event | None] = {}  # swapped blocks now on the device
        self.stack: list = []  # forward contexts of this step, for activation prefetch in backward
        self.anchor = torch.zeros((), device=self.host_device, requires_grad=True)  # makes every block's output require grad
        self.bytes_moved = 0  # frozen weights brought to the device (block swap)
        self.bytes_stashed = 0  # block inputs sent to the host (activation offload)
        self.training_forward = False
        for i in self.swapped:
            self.blocks[i].register_forward_pre_hook(self._pre_hook)
            self.blocks[i].register_forward_hook(self._post_hook)

    # ------------------------------------------------------------ weights
    def _copy_ctx(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def load(self, i: int) -> None:
        """Start bringing block i's frozen weights to the device (no-op if there or not swapped)."""
        if i not in self.swapped or i in self.ready:
            return
        pairs = self.host[i]
        dev = [torch.empty_like(h, device=self.device) for _, h in pairs]  # allocated on the compute stream
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._copy_ctx():
            for d, (_, h) in zip(dev, pairs):
                d.copy_(h, non_blocking=True)
                self.bytes_moved += h.numel() * h.element_size()
            ev = None
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(self.stream)
        for d, (p, _) in zip(dev, pairs):
            p.data = d
        self.ready[i] = ev

    def wait(self, i: int) -> None:
        if i not in self.swapped:
            return
        if i not in self.ready:
            self.load(i)
        ev = self.ready[i]
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
            self.ready[i] = None

    def evict(self, i: int) -> None:
        """Point block i's frozen weights back at their host copies; the device copies are freed."""
        if i in self.swapped and i in self.ready:
            self.wait(i)
            for p, h in self.host[i]:
                p.data = h
            del self.ready[i]

    def _pre_hook(self, block, args):
        i, n = self.index[id(block)], len(self.blocks)
        self.wait(i)
        # next block in use order: forward (no graph) goes up, backward's recompute (graph) goes down;
        # after a training forward's last block comes that block's backward, not block 0
        if torch.is_grad_enabled():
            self.load(i - 1)
        elif not (self.training_forward and i == n - 1):
            self.load((i + 1) % n)

    def _post_hook(self, block, args, output):
        i = self.index[id(block)]
        # in backward a block is evicted after its gradients; the last block of a training forward is
        # the first one backward needs
        if not torch.is_grad_enabled() and not (self.training_forward and i == len(self.blocks) - 1):
            self.evict(i)

    # ------------------------------------------------------------ activations
    def stash(self, t: torch.Tensor):
        if not self.offload:
            return t
        with on_host():
            host = torch.empty(t.shape, dtype=t.dtype, device=self.host_device, pin_memory=self.cuda)
        self.bytes_stashed += t.numel() * t.element_size()
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._copy_ctx():
            host.copy_(t, non_blocking=True)
            if self.cuda:
                t.record_stream(self.stream)
        return host

    def fetch(self, ctx) -> None:
        """Start bringing a stashed block input back to the device (idempotent)."""
        if not self.offload or ctx.fetched is not None or ctx.hidden is None:
            return
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._copy_ctx():
            t = ctx.hidden.to(self.device, non_blocking=True, copy=True)
            ev = None
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(self.stream)
        ctx.fetched = (t, ev)

    def unstash(self, ctx) -> torch.Tensor:
        if not self.offload:
            return ctx.hidden
        self.fetch(ctx)
        t, ev = ctx.fetched
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
            t.record_stream(torch.cuda.current_stream(self.device))
        ctx.fetched = None
        return t

    def __call__(self, block, hidden, *rest):
        return _CheckpointedBlock.apply(self, block, self.anchor, hidden, *rest)


class _CheckpointedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner, block, anchor, hidden, *rest):
        i = runner.index[id(block)]
        if i == 0:
            runner.stack.clear()
        runner.training_forward = True
        try:
            with torch.no_grad():
                out = block(hidden, *rest)
        finally:
            runner.training_forward = False
        ctx.runner, ctx.block, ctx.rest = runner, block, rest
        ctx.hidden_grad = hidden.requires_grad
        ctx.hidden = runner.stash(hidden.detach())
        ctx.fetched = None
        runner.stack.append(ctx)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        runner = ctx.runner
        if runner.stack and runner.stack[-1] is ctx:
            runner.stack.pop()
        hidden = runner.unstash(ctx).detach().requires_grad_(ctx.hidden_grad)
        if runner.stack:
            runner.fetch(runner.stack[-1])  # the next block in backward order
        rest = [r.detach().requires_grad_(True) if torch.is_tensor(r) and r.requires_grad else r for r in ctx.rest]
        with torch.enable_grad():
            out = ctx.block(hidden, *rest)
            torch.autograd.backward(out, grad_out)
        runner.evict(runner.index[id(ctx.block)])
        ctx.hidden = ctx.rest = None
        grads = [r.grad if torch.is_tensor(r) and r.requires_grad else None for r in rest]
        return (None, None, None, hidden.grad if ctx.hidden_grad else None, *grads)


def install(transformer, mode: MemoryMode, device: torch.device) -> BlockRunner | None:
    """Set up checkpointing / offload / swap of `mode` on a built transformer (after the LoRA is added)."""
    if mode.offload or mode.swap:
        runner = BlockRunner(transformer, device, mode.offload, mode.swap)
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=runner)
        transformer._block_runner = runner
        return runner
    if mode.checkpointing:
        transformer.enable_gradient_checkpointing()
    return None
