"""CPU inference kernels: every linear layer through oneDNN, with its weight packed once.

Why. PyTorch's fp32 `nn.Linear` on CPU calls the wheel's BLAS (MKL), which re-packs the
weight at every call and, on non-Intel CPUs, takes its generic code path; oneDNN, bundled
with PyTorch as "mkldnn", compiles for the CPU it finds and takes a weight reordered once
(docs/performance.md, "Kernels"). `torch.compile`'s CPU freezing pass makes the same
substitution; here it happens without compiling, so shapes stay dynamic, which per-image
token counts need.

Fused forms: the GELU after `Mlp.fc1` runs as oneDNN's "gelu" post-op (erf form, the same
values as `nn.GELU()`); the patch embedding, a convolution whose stride equals its kernel,
runs as one linear map over flattened patches; modules of the layers above register their
own with `register_fusion` (IA-RED²'s interpreter: a LayerNorm and one linear with the
sigmoid of Eq. 1 fused; with "native" kernels its whole stage, scores to kept tokens, in
C++). With "native" kernels each plain block with every token valid runs in one call to
the C++ extension (`iared.backbones.native`), and so does each block a policy swaps in
whose class registered a native form (`register_native_swap`: ATS, EViT, ToMe). At batch 1
the number of small operations is what a block's fixed cost is made of, so each fusion
removes calls, not FLOPs.

`cpu_kernels(model)` is a context manager for inference: it shadows the `forward` of
each module (no state-dict or parameter change) and restores them on exit. The packed
weights are a snapshot taken on entry, so load weights first. Whenever autograd is on,
or an input is not a CPU tensor of the layer's own dtype, a layer falls back to its own
forward, so training inside the context stays correct (and unaccelerated).

Layers in float32 or, where the CPU has native bf16 dot products (AVX512-BF16, AMX),
bfloat16 are packed, each in its own dtype: a model cast with `.to(torch.bfloat16)` runs
its linear layers through oneDNN's bf16 kernels.

The two ops used (`torch.ops.mkldnn._reorder_linear_weight`, `_linear_pointwise`) are
the private entry points inductor calls; `onednn_available` checks they exist and agree
with `F.linear` before anything is patched.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .native import native_module, unavailable_reason

Kernels = Literal["auto", "native", "onednn", "aten"]
KERNELS = ("auto", "native", "onednn", "aten")


@functools.lru_cache(maxsize=None)
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when PyTorch's oneDNN linear ops exist here for `dtype` (float32 or bfloat16)
    and match `F.linear` on a probe; bfloat16 also needs the CPU's native bf16 support."""
    try:
        if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        gen = torch.Generator().manual_seed(0)
        w, b, x = (torch.randn(*s, generator=gen).to(dtype) for s in ((5, 4), (5,), (3, 4)))
        with torch.no_grad():
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None),
                                                   b, "none", [], "")
        atol = 1e-5 if dtype == torch.float32 else 5e-2
        return y.dtype == dtype and torch.allclose(y.float(), F.linear(x, w, b).float(), atol=atol)
    except (AttributeError, RuntimeError):
        return False


def resolve_kernels(kernels: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The kernels a forward will really use: "native", "onednn" or "aten".

    "onednn": every linear layer through oneDNN with its weight packed once; "native":
    that, and each plain ViT block, ATS, EViT or ToMe block and IA-RED² stage of one image
    in one call to the C++ extension (`iared.backbones.native`).
    "auto" picks the first of native, onednn, aten that runs here (on CPU for `dtype`).
    Asking for one that cannot run (a GPU, a build without oneDNN, bfloat16 on a CPU
    without native bf16, no C++ block) is an error rather than a silent fallback, so a
    benchmark never records kernels it did not run.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "aten":
        return "aten"
    usable = torch.device(device).type == "cpu" and onednn_available(dtype)
    if kernels in ("onednn", "native") and not usable:
        where = f"{device}" if dtype == torch.float32 else f"{device} in {str(dtype).removeprefix('torch.')}"
        raise ValueError(f"oneDNN kernels are not available on {where}")
    if kernels == "onednn" or not usable:
        return "onednn" if usable else "aten"
    if native_module() is None:
        if kernels == "native":
            raise ValueError(f"the C++ block is not available: {unavailable_reason()}")
        return "onednn"
    return "native"


def fast_path(x: Tensor, dtype: torch.dtype) -> bool:
    return not torch.is_grad_enabled() and x.dtype == dtype and x.device.type == "cpu"


def packable(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and onednn_available(weight.dtype)


def _packed_linear(mod: nn.Linear):
    weight = torch.ops.mkldnn._reorder_linear_weight(mod.weight.detach(), None)
    bias = None if mod.bias is None else mod.bias.detach()
    plain = type(mod).forward.__get__(mod)
    dtype = mod.weight.dtype

    def forward(x: Tensor) -> Tensor:
        if not fast_path(x, dtype):
            return plain(x)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    return forward, weight, bias


def _fused_mlp(mod: nn.Module, fc1_weight: Tensor, fc1_bias) -> object:
    plain = type(mod).forward.__get__(mod)
    dtype = mod.fc1.weight.dtype

    def forward(x: Tensor) -> Tensor:
        if not fast_path(x, dtype):
            return plain(x)
        return mod.fc2(torch.ops.mkldnn._linear_pointwise(x, fc1_weight, fc1_bias, "gelu", [], "none"))

    return forward


def _patch_linear(mod: nn.Module):
    conv = mod.proj
    D, C, ph, pw = conv.weight.shape
    weight = torch.ops.mkldnn._reorder_linear_weight(conv.weight.detach().reshape(D, C * ph * pw), None)
    bias = None if conv.bias is None else conv.bias.detach()
    plain = type(mod).forward.__get__(mod)
    dtype = conv.weight.dtype

    def forward(x: Tensor) -> Tensor:
        if not fast_path(x, dtype) or x.dim() != 4 or tuple(x.shape[1:]) != (C, *mod.img_size):
            return plain(x)  # also the shape check and its error message
        B, gh, gw = x.shape[0], *mod.grid_size
        patches = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
        return torch.ops.mkldnn._linear_pointwise(patches, weight, bias, "none", [], "")  # (B, N, D)

    return forward


def _is_plain_block(mod: nn.Module, packed: dict) -> bool:
    """Our ViT `Block` exactly as defined (LayerNorms, attention, GELU MLP, every linear packed,
    no hooks or shadowed forwards inside), or a subclass a policy swaps in that registered a
    native form: the blocks the C++ extension computes."""
    from .vit import Attention, Block

    if (type(mod) is not Block and type(mod) not in _NATIVE_SWAPS) or type(mod.attn) is not Attention \
            or not _is_gelu_mlp(mod.mlp):
        return False
    linears = (mod.attn.qkv, mod.attn.proj, mod.mlp.fc1, mod.mlp.fc2)
    norms = (mod.norm1, mod.norm2)
    inner = [m for m in mod.modules() if m is not mod and m not in linears]
    return (all(m in packed for m in linears) and all(m.bias is not None for m in linears[1:])
            and all(type(n) is nn.LayerNorm and n.weight is not None and n.bias is not None for n in norms)
            and not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in inner)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in linears))


def _native_block(mod: nn.Module, packed: dict) -> Callable:
    from .vit import Block

    attn, mlp = mod.attn, mod.mlp
    weights = [mod.norm1.weight, mod.norm1.bias, packed[attn.qkv][0], packed[attn.proj][0], attn.proj.bias,
               mod.norm2.weight, mod.norm2.bias, packed[mlp.fc1][0], mlp.fc1.bias, packed[mlp.fc2][0], mlp.fc2.bias]
    native = native_module().Block([w.detach() for w in weights], packed[attn.qkv][1], attn.num_heads,
                                   attn.scale, mod.norm1.eps, mod.norm2.eps)
    dtype = attn.qkv.weight.dtype

    def forward(tokens):
        # A policy may swap the block's class while patched (ATS, EViT, ToMe): its forward
        # rules, by its registered native form where it has one and that applies.
        cls = type(mod)
        if tokens.valid is None and fast_path(tokens.x, dtype):
            if cls is Block:
                return tokens.with_x(native(tokens.x))
            swap = _NATIVE_SWAPS.get(cls)
            if swap is not None and tokens.x.shape[0] == 1 and tokens.execution == "compact":
                out = swap(mod, native, tokens)
                if out is not None:
                    return out
        return cls.forward(mod, tokens)  # masks, training, other dtypes: the PyTorch block

    return forward


# Native forms of block classes a policy swaps in (ATS, EViT, ToMe), registered by the
# module that defines them: forward(block, native, tokens) -> the block's output, or None
# where the native form does not apply (the class's own forward runs). Called only for one
# image whose tokens are all valid, in compact execution, under inference.
_NATIVE_SWAPS: dict[type, Callable[[nn.Module, object, object], object]] = {}


def register_native_swap(cls: type, forward: Callable[[nn.Module, object, object], object]) -> None:
    """Inside `cpu_kernels(kernels="native")`, run blocks of class `cls` by `forward`, given the
    block's C++ form (`csrc/block.cpp`'s `Block`) and the tokens."""
    _NATIVE_SWAPS[cls] = forward


# Fused forms of modules defined above the backbones (the IA-RED² interpreter), registered
# by the module that defines them, so this one imports nothing from those layers.
_FUSIONS: dict[tuple[type, str], tuple[Callable[[nn.Module], bool], Callable[[nn.Module], Callable], tuple]] = {}


def register_fusion(cls: type, attribute: str, eligible: Callable[[nn.Module], bool],
                    build: Callable[[nn.Module], Callable], kernels: tuple[str, ...] = ("onednn", "native")) -> None:
    """Inside `cpu_kernels` with one of `kernels`, shadow `attribute` of each `cls` instance
    with `eligible(mod)` by `build(mod)` (a fused inference form; restored on exit)."""
    _FUSIONS[cls, attribute] = (eligible, build, kernels)


def _is_patch_conv(mod: nn.Module) -> bool:
    from .vit import PatchEmbed

    conv = getattr(mod, "proj", None)
    return (type(mod) is PatchEmbed and type(conv) is nn.Conv2d and packable(conv.weight)
            and tuple(conv.stride) == tuple(conv.kernel_size) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1)


def _is_gelu_mlp(mod: nn.Module) -> bool:
    # Only the exact Linear-GELU(erf)-Linear MLP of our backbones, whose forward is that chain.
    from .vit import Mlp

    return (type(mod) is Mlp and isinstance(mod.act, nn.GELU) and mod.act.approximate == "none"
            and type(mod.fc1) is nn.Linear)


@contextlib.contextmanager
def cpu_kernels(model: nn.Module, kernels: Kernels = "auto") -> Iterator[str]:
    """Run `model`'s linear layers through oneDNN inside the block (inference only).

    Args:
        model: any module; its `nn.Linear` layers (and our ViT's GELU MLPs, patch
            embeddings, blocks and IA-RED² interpreters) are patched.
        kernels: "auto" (the fastest that runs here), "native" (oneDNN linears and the
            C++ block, required), "onednn" (oneDNN linears, required) or "aten" (leave
            the model as it is); see `resolve_kernels`.

    Yields:
        The kernels in use, "native", "onednn" or "aten" (for result files).
    """
    first = next(model.parameters(), None)
    chosen = resolve_kernels(kernels, "cpu" if first is None else first.device,
                             torch.float32 if first is None else first.dtype)
    if chosen == "aten":
        yield chosen
        return
    patched: list[tuple[nn.Module, str]] = []
    try:
        packed = {}
        for mod in model.modules():
            if type(mod) is nn.Linear and packable(mod.weight) and "forward" not in vars(mod):
                mod.forward, *packed[mod] = _packed_linear(mod)
                patched.append((mod, "forward"))
        for mod in model.modules():
            if _is_gelu_mlp(mod) and mod.fc1 in packed and "forward" not in vars(mod):
                mod.forward = _fused_mlp(mod, *packed[mod.fc1])
                patched.append((mod, "forward"))
            elif chosen == "native" and _is_plain_block(mod, packed) and "forward" not in vars(mod):
                mod.forward = _native_block(mod, packed)
                patched.append((mod, "forward"))
            elif _is_patch_conv(mod) and "forward" not in vars(mod):
                mod.forward = _patch_linear(mod)
                patched.append((mod, "forward"))
            for (cls, attribute), (eligible, build, kinds) in _FUSIONS.items():
                if type(mod) is cls and chosen in kinds and attribute not in vars(mod) and eligible(mod):
                    setattr(mod, attribute, build(mod))
                    patched.append((mod, attribute))
        yield chosen
    finally:
        for mod, name in patched:
            delattr(mod, name)  # the instance attribute: the class's method shows through again
