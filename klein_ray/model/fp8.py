"""FP8 linear layers for the transformer: float8 (E4M3) weights and activations, one GEMM.

Owns ``precision: fp8``. Every ``nn.Linear`` inside the transformer's repeated blocks (the
double- and single-stream blocks: attention projections and MLPs, ~97% of its parameters) is
replaced by ``Fp8Linear``: the weight is stored in float8_e4m3fn with one float32 scale per
output row; each call scales the activations per token (row) by their own absolute maximum
("dynamic" scaling: nothing is calibrated), casts them to float8 and multiplies with
``torch._scaled_mm``, which folds both scales into the product. The layers outside the blocks
(input embedders, time/guidance embedding, modulation, the final projection) stay in the model's
dtype: they are a small share of the work and the ones most sensitive to rounding.

Why ``torch._scaled_mm`` and not torchao: it is the kernel torchao's float8 inference ends in,
it needs no extra dependency on the workers, and under ``torch.compile`` the activation scaling
(abs-max, divide, cast) fuses into one kernel before it, as torchao's does.

Weights that arrive in float8 already (BFL's fp8 checkpoints: one scale per tensor) are kept
exactly: re-quantizing ``weight * scale`` with the same scale gives back the file's float8 codes
bit for bit (the product's rounding is ~2^-9 relative at worst, far below float8's half step).

Devices: CUDA needs FP8 tensor cores (compute capability 8.9, Ada, or 9.0+, Hopper and later);
elsewhere ``fp8_problem`` says why not and the model refuses. Per-row scales on both operands
need a CUDA kernel not every build has (``probe_rowwise``); without it the activations get one
scale per call and the weight's row scales are applied after the product (same result up to
rounding). On CPU the same code runs through torch's CPU ``_scaled_mm`` (oneDNN): correct and
testable, not fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row still gets a finite scale
BLOCKS = ("transformer_blocks", "single_transformer_blocks")
ALIGN = 16  # _scaled_mm needs both matrix dimensions of the weight divisible by 16


@dataclass(frozen=True)
class Fp8Report:
    """What ``quantize_transformer`` did: layers replaced, and how many kept a file's codes."""

    layers: int
    parameters: int
    kept_from_file: int
    skipped: tuple[str, ...]  # linear layers left in the model's dtype (shape not 16-aligned)
    rowwise: bool


def fp8_problem(device: str) -> str | None:
    """Why ``device`` cannot run FP8 GEMMs, or None where it can."""
    if not device.startswith("cuda"):
        return None if device == "cpu" else f"FP8 needs a CUDA GPU or the CPU, not {device!r}"
    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(index)
        return (f"{name} (compute capability {major}.{minor}) has no FP8 tensor cores: "
                "precision 'fp8' needs compute capability 8.9 (Ada) or 9.0+ (Hopper, Blackwell)")
    return None


def quantize_weight(weight: torch.Tensor, tensor_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 codes, float32 scale per row) of a 2-D weight. ``tensor_scale``: the scale a
    checkpoint stored the weight with (its codes are then recovered exactly)."""
    w = weight.detach().float()
    if tensor_scale is not None:
        scale = torch.full((w.shape[0], 1), float(tensor_scale), device=w.device)
    else:
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    codes = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale.reshape(-1)


class Fp8Linear(nn.Module):
    """``y = x @ W.T (+ b)`` with W in float8 (per-row scales) and x cast to float8 per call."""

    weight: torch.Tensor  # buffers, registered in __init__ (declared for the type checker)
    weight_scale: torch.Tensor

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, rowwise: bool = True):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight", codes)  # (out, in) row-major: .t() is the column-major mat2
        self.register_buffer("weight_scale", scale.float().reshape(1, -1))  # (1, out)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_dtype = out_dtype
        self.rowwise = rowwise

    @classmethod
    def from_linear(cls, linear: nn.Linear, tensor_scale: float | None = None, rowwise: bool = True) -> Fp8Linear:
        codes, scale = quantize_weight(linear.weight, tensor_scale)
        return cls(codes, scale, linear.bias, linear.weight.dtype, rowwise)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 (for fidelity checks)."""
        return self.weight.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. Flatten to (tokens, in) and scale each token's activations into float8's range.
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if self.rowwise:
            x_scale = (x2.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
        else:
            x_scale = (x2.abs().amax() / FP8_MAX).clamp(min=MIN_SCALE).reshape(1, 1)
        xq = (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)

        # 2. One scaled GEMM: both scales applied inside it where the kernel allows per-row ones.
        if self.rowwise:
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                   out_dtype=self.out_dtype)
        else:
            one = torch.ones((), device=x.device)
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale.reshape(()), scale_b=one,
                                   out_dtype=torch.float32)
            out = (out * self.weight_scale).to(self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rowwise={self.rowwise}"


def probe_rowwise(device: str) -> bool:
    """Whether this torch build has the per-row-scaled float8 GEMM on ``device``."""
    a = torch.ones((16, 32), device=device).to(FP8)
    b = torch.ones((16, 32), device=device).to(FP8)
    try:
        torch._scaled_mm(a, b.t(), scale_a=torch.ones((16, 1), device=device),
                         scale_b=torch.ones((1, 16), device=device), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def quantize_transformer(transformer: nn.Module, file_scales: dict[str, float] | None = None) -> Fp8Report:
    """Replace the linear layers of ``transformer``'s repeated blocks by ``Fp8Linear`` in place.
    ``file_scales``: module name -> per-tensor scale of weights a checkpoint stored in float8."""
    file_scales = file_scales or {}
    first = next(transformer.parameters())
    device = str(first.device)
    # CUDA's per-row kernel writes bfloat16 only; float16/float32 models take the per-call path.
    rowwise = device == "cpu" or (first.dtype == torch.bfloat16 and probe_rowwise(device))
    layers = params = kept = 0
    skipped: list[str] = []
    for block_list in BLOCKS:
        for name, module in list(getattr(transformer, block_list).named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            full = f"{block_list}.{name}"
            if module.in_features % ALIGN or module.out_features % ALIGN:
                skipped.append(full)
                continue
            scale = file_scales.get(full)
            parent_name, _, attr = full.rpartition(".")
            setattr(transformer.get_submodule(parent_name), attr, Fp8Linear.from_linear(module, scale, rowwise))
            layers += 1
            params += module.weight.numel()
            kept += scale is not None
    if not layers:
        raise ValueError("precision 'fp8': the transformer has no linear layer whose dimensions "
                         f"are multiples of {ALIGN}")
    return Fp8Report(layers, params, kept, tuple(skipped), rowwise)
