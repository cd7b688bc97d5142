"""float32 linear layers on CPU through oneDNN instead of the BLAS torch picks (MKL).

torch multiplies float32 matrices on CPU with MKL's sgemm, and only bf16/fp16 ones with oneDNN. On
AMD CPUs MKL does not use its AVX-512 kernels: on the 2-core Zen 5 development machine a
[2048, 576] x [576, 1536] float32 product runs at about 180 GFLOP/s with MKL and about 400 GFLOP/s
with oneDNN (`torch.ops.mkldnn._linear_pointwise`, the op torch's inductor uses for CPU linears), and
decode-sized ones (16 or 64 rows) 2-3.5x faster (benchmarks/RESULTS.md). Both compute in float32
with float32 accumulation; results differ only in rounding (the order of the sums).

`use_onednn(model)` turns each plain `nn.Linear` of a model into a `OneDNNLinear` (same parameters,
same state dict; only `forward` differs), whose forward and backward both run on oneDNN when the
call is eligible: CPU tensors, all float32, autocast off. Any other call (CUDA, bf16 weights,
float64, an autocast region) takes `torch.nn.functional.linear` unchanged. Subclasses of
`nn.Linear` (bitsandbytes' 4-bit layers, peft's LoRA wrappers) are left alone; the plain layers
inside them are converted.

`cpu_linear` (a config field) chooses: `onednn`, `torch` (torch's own choice), or `auto` (the default):
oneDNN on AMD CPUs, whose MKL path lacks AVX-512, for layers of at least `AUTO_MIN_WEIGHT` weights, and
torch's choice elsewhere (on Intel CPUs MKL runs its AVX-512 kernels; not measured here). The rule is
deliberately not a timing probe: the same machine always makes the same choice, so two runs of one
config (and a run and its resume) compute alike.

Under `auto` on other CPUs (Intel) the in-process sampler's no-grad products of the plain float32 layers of at
least `AUTO_MIN_WEIGHT` weights run on MKL's packed GEMM (cblas_sgemm_pack / compute through torch's
`torch.ops.mkl._mkl_linear`, the op torch's inductor uses for CPU linears), each weight packed once per
generation for the batch's row count (`packed_weights(..., mkl_rows=N)`). MKL's plain sgemm packs its operands
inside every call; with the weights packed once, a float32 SmolLM2-135M decode step on a 2-core Xeon without
avx512_bf16 took 21% less time at 8 rows and 16% less at 64 (benchmarks/RESULTS.md). Where the sampler's lean
decoder runs (grpokit.models.decoder: Llama, Mistral, Qwen2, Qwen3) and every linear layer is at least
`AUTO_MIN_WEIGHT` weights, the decoder holds the packed copies itself, one per fused product, and the layers stay
plain; otherwise `packed_weights` packs the layers that qualify.
Same float32 math and accumulation; results differ in rounding only. `torch` keeps MKL's plain sgemm everywhere.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from functools import cache

import torch

from grpokit.errors import ConfigError
from grpokit.runtime import cpu_info

# MKL's packed GEMM serves from this many rows up: below it MKL's plain sgemm is faster (near a matrix-vector product).
# A float32 SmolLM2-135M decode position on a 2-core Xeon, plain / packed: 3 rows 34.8 / 36.0 ms, 4 rows 47.0 / 38.3
MKL_MIN_ROWS = 4

# auto leaves smaller layers to torch: a oneDNN call costs ~15 us more than MKL's on a 64 x 32 weight and wins
# from 256 x 256 on (a 37-row input: 87 us vs 425 us on the development machine); tiny test models stay on MKL
AUTO_MIN_WEIGHT = 1 << 14


@cache
def onednn_available() -> bool:
    """Whether this torch build has the oneDNN linear op and it runs here."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        out = op(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.backends.mkldnn.is_available() and out.shape == (2, 4) and torch.all(out == 3))


@cache
def mkl_packed_available() -> bool:
    """Whether this torch build has MKL's packed float32 product (`torch.ops.mkl._mkl_linear`) and it runs here."""
    try:
        weight, x = torch.arange(12, dtype=torch.float32).view(4, 3), torch.ones(2, 3)
        out = torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(weight, 2), weight, None, 2)
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.backends.mkl.is_available() and torch.equal(out, x @ weight.T))


@cache
def mkl_shape_stand_in_works() -> bool:
    """Whether MKL's packed op reads only the shape of its plain-weight argument when the input has the rows packed
    for (torch 2.13's does), so that a zero-stride view can stand in for a weight that is not held."""
    if not mkl_packed_available():
        return False
    weight, x = torch.arange(12, dtype=torch.float32).view(4, 3), torch.ones(2, 3)
    stand_in = weight.new_zeros(()).expand(weight.shape)
    out = torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(weight, 2), stand_in, None, 2)
    return torch.equal(out, x @ weight.T)


def _matmul(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ weight[N, K]^T (+ bias) -> [M, N] on oneDNN; any strides."""
    return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = _matmul(x.reshape(-1, x.shape[-1]), weight, bias)  # [M, N]
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])  # [M, N]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(grad_out, weight.t()).view(x.shape)  # [M, N] @ [N, K]
        if ctx.needs_input_grad[1]:
            grad_weight = _matmul(grad_out.t(), x.reshape(-1, x.shape[-1]).t())  # [N, M] @ [M, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0)
        return grad_x, grad_weight, grad_bias


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and x.numel() > 0 and weight.dim() == 2 and not torch.is_autocast_enabled("cpu") and onednn_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.nn.functional.linear`, on oneDNN where eligible (CPU, float32, no autocast)."""
    if _eligible(x, weight, bias):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def _mkl_pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """weight [N, K] packed by MKL for products with `rows`-row inputs (an opaque tensor for `_mkl_product`)."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


def _mkl_product(a: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 rows: int) -> torch.Tensor:
    """a [rows, K] @ weight[N, K]^T (+ bias) -> [rows, N] on MKL's packed GEMM (`packed`: weight packed for rows)."""
    return torch.ops.mkl._mkl_linear(a, packed, weight, bias, rows)


class OneDNNLinear(torch.nn.Linear):
    """An `nn.Linear` whose eligible calls run on oneDNN; made by `use_onednn`, never constructed directly."""

    _packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout, set by `packed_weights`

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and not torch.is_grad_enabled() and _eligible(input, self.weight, self.bias):
            out = _matmul(input.reshape(-1, input.shape[-1]), self._packed, self.bias)
            return out.view(*input.shape[:-1], self.out_features)
        return linear(input, self.weight, self.bias)


class PackedBF16Linear(torch.nn.Linear):
    """A linear layer that, inside `packed_weights` under bf16 autocast, runs its no-grad calls as one bf16 oneDNN
    product on a bf16 copy of its weight packed once per context: what autocast computes (bf16 operands, float32
    accumulation, a bf16 result), without autocast's per-call dispatch and plain-layout bf16 kernel. Set on a
    layer only for the context's duration (its class is put back after); any other call takes the base forward."""

    _packed_bf16: torch.Tensor | None = None
    _bias_bf16: torch.Tensor | None = None
    _base: type = torch.nn.Linear  # the class to use outside the fast path and to restore

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (self._packed_bf16 is not None and not torch.is_grad_enabled() and input.device.type == "cpu"
                and input.numel() > 0 and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            x = input.reshape(-1, input.shape[-1]).to(torch.bfloat16)
            out = _matmul(x, self._packed_bf16, self._bias_bf16)
            return out.view(*input.shape[:-1], self.out_features)
        return self._base.forward(self, input)


class PackedMKLLinear(torch.nn.Linear):
    """A plain float32 linear layer that, inside `packed_weights(..., mkl_rows=N)`, runs its no-grad calls of more
    than N / 2 and at most N rows on MKL's packed GEMM with its weight packed for N rows (fewer rows are padded
    with zeros to N: MKL's packed product serves only the row count it was packed for, and at decode sizes the
    weight's read, not the rows, sets its cost; `fit_packed` repacks once the batch has halved). Set on a layer
    only for the context's duration (its class is put back after); any other call takes `nn.Linear`'s forward."""

    _packed_mkl: torch.Tensor | None = None
    _rows: int = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows, m = self._rows, input.numel() // max(input.shape[-1], 1)
        if (self._packed_mkl is not None and rows < 2 * m and m <= rows and not torch.is_grad_enabled()
                and input.shape[-1] == self.in_features and input.device.type == "cpu"
                and input.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
            x = input.reshape(m, self.in_features)
            if m < rows:
                x = torch.cat((x, x.new_zeros(rows - m, self.in_features)))
            out = _mkl_product(x, self._packed_mkl, self.weight, self.bias, rows)
            return out[:m].view(*input.shape[:-1], self.out_features)
        return torch.nn.Linear.forward(self, input)


def _bf16_packing_applies() -> bool:
    return (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def packed_weights(model: torch.nn.Module, rows: int = 64, *, mkl_rows: int | None = None) -> Iterator[int]:
    """Inside the context, `model`'s linear layers run their no-grad calls on copies of their weights reordered
    once into oneDNN's blocked layout (`rows`: the typical row count, a layout hint; any count works) or packed for
    MKL; yields how many layers. The weights must not change inside the context.

    - float32, autocast off: the `OneDNNLinear` layers (cpu_linear onednn / auto on AMD), on a float32 copy.
      Decode-sized products run ~15-25% faster on it (benchmarks/RESULTS.md); the copy costs the layers' weight
      memory again while the context lasts (the plan counts it).
    - float32, autocast off, `mkl_rows` given (cpu_linear auto on other CPUs: `mkl_rows`): the plain
      `nn.Linear` layers of at least `AUTO_MIN_WEIGHT` weights, on a float32 copy packed by MKL for `mkl_rows`
      rows (`PackedMKLLinear`; the same memory again, counted by the plan).
    - bf16 autocast on CPU (where oneDNN has bf16): every plain float32 linear layer of at least `AUTO_MIN_WEIGHT`
      weights, `OneDNNLinear` too, on a bf16 copy (half the float32 weights' memory: the copies autocast would
      cache) through oneDNN's bf16 product: on decode-sized products about 2x faster than autocast's own path
      inside a generation (its cached bf16 weights on the plain-layout kernel), which made a whole bf16
      generation 4-8% faster on the Xeon measured (benchmarks/RESULTS.md). Same operands and float32
      accumulation as autocast; results differ in rounding only. Subclasses (peft's LoRA wrappers, 4-bit
      layers) are left alone; the plain layers inside them are packed."""
    if torch.is_autocast_enabled("cpu"):
        yield from _packed_bf16(model, rows) if _bf16_packing_applies() else iter([0])
        return
    layers = [m for m in model.modules()
              if type(m) is OneDNNLinear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    plain = [] if mkl_rows is None or not mkl_packed_available() else [
        m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
        and m.weight.device.type == "cpu" and m.weight.numel() >= AUTO_MIN_WEIGHT
        and (m.bias is None or m.bias.dtype == torch.float32)]
    try:
        with torch.no_grad():
            for layer in layers:
                layer._packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows)
            for layer in plain:
                layer.__class__ = PackedMKLLinear
                layer._rows = mkl_rows
                layer._packed_mkl = _mkl_pack(layer.weight.detach(), mkl_rows)
        yield len(layers) + len(plain)
    finally:
        for layer in layers:
            layer._packed = None
        for layer in plain:
            for name in ("_packed_mkl", "_rows"):
                layer.__dict__.pop(name, None)
            layer.__class__ = torch.nn.Linear


def _packed_bf16(model: torch.nn.Module, rows: int) -> Iterator[int]:
    layers = [m for m in model.modules()
              if type(m) in (torch.nn.Linear, OneDNNLinear) and m.weight.dtype == torch.float32
              and m.weight.device.type == "cpu" and m.weight.numel() >= AUTO_MIN_WEIGHT
              and (m.bias is None or m.bias.dtype == torch.float32)]
    bases = [type(m) for m in layers]
    try:
        with torch.no_grad():
            for layer, base in zip(layers, bases, strict=True):
                layer.__class__ = PackedBF16Linear
                layer._base = base
                layer._packed_bf16 = torch.ops.mkldnn._reorder_linear_weight(
                    layer.weight.detach().to(torch.bfloat16), rows)
                layer._bias_bf16 = layer.bias.detach().to(torch.bfloat16) if layer.bias is not None else None
        yield len(layers)
    finally:
        for layer, base in zip(layers, bases, strict=True):
            for name in ("_packed_bf16", "_bias_bf16", "_base"):
                layer.__dict__.pop(name, None)
            layer.__class__ = base


def use_onednn(model: torch.nn.Module, min_weight: int = 0) -> int:
    """Turn every plain `nn.Linear` in `model` with at least `min_weight` weights into a `OneDNNLinear` in place;
    returns how many were turned."""
    converted = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.numel() >= min_weight:
            module.__class__ = OneDNNLinear
            converted += 1
    return converted


def restore(model: torch.nn.Module) -> None:
    """Undo `use_onednn`."""
    for module in model.modules():
        if type(module) is OneDNNLinear:
            module.__class__ = torch.nn.Linear


def cpu_vendor() -> str:
    """The CPU's vendor id ("AuthenticAMD", "GenuineIntel", ...), "" where it cannot be read."""
    return cpu_info("vendor_id") or platform.processor()


MODES = ("auto", "onednn", "torch")  # the config's `cpu_linear` values


def check_mode(mode: str, where: str = "cpu_linear") -> str:
    """`mode` if it is one of MODES; else a ValueError naming `where` and the values it takes."""
    if mode not in MODES:
        raise ValueError(f"{where}={mode!r} is not a cpu_linear setting: use one of {', '.join(map(repr, MODES))}")
    return mode


def min_weight(mode: str, device: torch.device | str) -> int | None:
    """The smallest weight (element count) put on oneDNN under `mode` on `device`; None where none is."""
    check_mode(mode)
    if torch.device(device).type != "cpu" or mode == "torch":
        return None
    if mode == "auto" and "AMD" not in cpu_vendor():
        return None
    if not onednn_available():
        if mode == "onednn":
            raise ConfigError("cpu_linear: onednn, but this torch build cannot run oneDNN's linear op "
                              "(torch.ops.mkldnn._linear_pointwise); set cpu_linear: torch (or auto)")
        return None
    return AUTO_MIN_WEIGHT if mode == "auto" else 0


def fit_packed(model: torch.nn.Module, rows: int) -> int:
    """The sampler's batch is down to `rows`: every `PackedMKLLinear` of `model` packed for at least twice as many
    is packed again for `rows`; below `MKL_MIN_ROWS` rows each drops its packed copy (however many it was packed
    for) and runs MKL's plain sgemm. Returns how many layers changed. A repack reads and writes the weights once,
    so halving bounds it to a few per generation."""
    changed = 0
    with torch.no_grad():
        for layer in model.modules():
            if (type(layer) is PackedMKLLinear and layer._packed_mkl is not None
                    and (2 * rows <= layer._rows or rows < MKL_MIN_ROWS)):
                layer._packed_mkl = None  # freed before the new copy is made
                if rows >= MKL_MIN_ROWS:
                    layer._packed_mkl = _mkl_pack(layer.weight.detach(), rows)
                layer._rows = rows
                changed += 1
    return changed


def mkl_rows(mode: str, device: torch.device | str, rows: int) -> int | None:
    """The row count the sampler packs the plain float32 layers for (`packed_weights`' `mkl_rows`) when it
    generates `rows` rows under `mode` on `device`, or None: under auto, on a CPU that is not AMD's (there auto puts
    them on oneDNN), where MKL's packed op runs, from `MKL_MIN_ROWS` rows up."""
    check_mode(mode)
    use = (mode == "auto" and rows >= MKL_MIN_ROWS and torch.device(device).type == "cpu"
           and "AMD" not in cpu_vendor() and mkl_packed_available())
    return rows if use else None


def apply(model: torch.nn.Module, mode: str, device: torch.device | str) -> bool:
    """Put `model`'s linear layers on oneDNN if `mode` ("auto", "onednn", "torch") asks for it on this device;
    returns whether it did."""
    smallest = min_weight(mode, device)
    return smallest is not None and use_onednn(model, smallest) > 0
