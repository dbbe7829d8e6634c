"""The C++ block (`iared.backbones.native`): the same values as the PyTorch block, used only
where it computes the same thing, and a clean fallback where it cannot be built.

Not timed: its speed is measured by `iared bench speed` (the JSON records "kernels": "native").
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import iared
from iared.backbones import native
from iared.backbones.kernels import cpu_kernels, onednn_available, resolve_kernels
from iared.backbones.vit import Block

from helpers import FixedKeep, tiny_model, uneven_keeps

can_build = shutil.which("c++") is not None  # ninja comes with the package
needs_native = pytest.mark.skipif(not (onednn_available() and native.native_module() is not None),
                                  reason="no oneDNN or no C++ block here")


@pytest.mark.skipif(not (can_build and onednn_available()), reason="no C++ compiler here")
def test_builds_where_a_compiler_is():
    assert native.native_module() is not None
    assert resolve_kernels("auto") == resolve_kernels("native") == "native"


def _blocks_run_natively(model) -> int:
    return sum("forward" in vars(b) and "native" in b.forward.__qualname__ for b in model.blocks)


@needs_native
@pytest.mark.parametrize("distilled", [False, True])
def test_one_image_gives_the_masked_reference_logits(distilled):
    model = tiny_model(distilled=distilled)
    model.policy = FixedKeep(uneven_keeps(3, model.grid_size, [0, 2, 4]))
    model.policy.rows = torch.tensor([2])  # an image that keeps some tokens at each stage
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x, execution="mask")
        with cpu_kernels(model, "native") as used:
            assert used == "native" and _blocks_run_natively(model) == len(model.blocks)
            fast, info = model(x, execution="compact", return_info=True)
    assert info.block_tokens[0, -1] < info.block_tokens[0, 0] <= model.grid_size  # tokens really dropped
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    assert _blocks_run_natively(model) == 0


@needs_native
def test_padded_batches_masks_and_gradients_take_the_pytorch_block():
    model = tiny_model()
    B = 5
    model.policy = FixedKeep(uneven_keeps(B, model.grid_size, [0, 3]))
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, execution="mask")
    with cpu_kernels(model, "native"):
        with torch.inference_mode():
            packed = model(x, execution="compact")   # padding: the packed PyTorch path
            masked = model(x, execution="mask")      # attention masks: the PyTorch block
        model.policy = None
        y = model(x)                                 # autograd on: the PyTorch block, trainable
        y.sum().backward()
    torch.testing.assert_close(packed, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(masked, ref, rtol=1e-4, atol=1e-5)
    assert model.blocks[0].mlp.fc1.weight.grad is not None


@needs_native
def test_blocks_with_hooks_or_other_parts_are_left_to_pytorch():
    model = tiny_model(depth=3)
    seen = []
    model.blocks[0].attn.register_forward_hook(lambda *a: seen.append(1))
    model.blocks[1].mlp.act = torch.nn.ReLU()
    with torch.inference_mode(), cpu_kernels(model, "native"):
        assert ["forward" in vars(b) for b in model.blocks] == [False, False, True]
        model(torch.randn(1, 3, 32, 32))
    assert seen == [1]


@needs_native
def test_block_without_qkv_bias_with_its_own_scale_and_eps():
    torch.manual_seed(0)
    model = tiny_model(depth=1)
    model.blocks[0] = blk = Block(32, 4, qkv_bias=False, attn_scale=0.3, eps=1e-3).eval()
    with torch.no_grad():
        for norm in (blk.norm1, blk.norm2):  # not the identity LayerNorm affine
            norm.weight.normal_()
            norm.bias.normal_()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
        with cpu_kernels(model, "native"):
            assert _blocks_run_natively(model) == 1
            fast = model(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_unbuildable_source_warns_once_and_falls_back(tmp_path, monkeypatch):
    bad = tmp_path / "block.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # never touch the real build
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setattr(native, "NAME", "iared_native_broken")  # torch would version the real one up
    native.native_module.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"C\+\+ block could not be built"):
            assert native.native_module() is None
        assert native.native_module() is None  # cached: no second build, no second warning
        if onednn_available():
            assert resolve_kernels("auto") == "onednn"
            with pytest.raises(ValueError, match=r"C\+\+ block is not available"):
                resolve_kernels("native")
            model = tiny_model(depth=2)
            with torch.inference_mode(), cpu_kernels(model) as used:
                assert used == "onednn" and _blocks_run_natively(model) == 0
    finally:
        native.native_module.cache_clear()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(native.DISABLE, "0")
    native.native_module.cache_clear()
    try:
        assert native.native_module() is None
        if onednn_available():
            with pytest.raises(ValueError, match="IARED_NATIVE=0 is set"):
                resolve_kernels("native")
    finally:
        native.native_module.cache_clear()


@needs_native
@pytest.mark.skipif(not onednn_available(torch.bfloat16), reason="no oneDNN bf16 linear here")
def test_bfloat16_block_matches_the_pytorch_block():
    model = tiny_model().to(torch.bfloat16)
    x = torch.randn(1, 3, 32, 32).to(torch.bfloat16)
    with torch.inference_mode():
        with cpu_kernels(model, "onednn"):
            ref = model(x)
        with cpu_kernels(model, "native"):
            assert _blocks_run_natively(model) == len(model.blocks)
            fast = model(x)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)  # the same kernels in the same order


# A budget that drops something on the tiny model's 64-token grid, per budget setting.
DROPPING = {"threshold": None, "rho": 0.5, "keep_ratio": 0.5, "keep_rate": 0.5, "r": 8}


@needs_native
@pytest.mark.filterwarnings("ignore:policy .* drops no token")
@pytest.mark.parametrize("name", [n for n in iared.available_policies() if n != "tempdiff"])
def test_every_policy_patched_inside_the_kernels_gives_its_own_logits(name):
    # `iared bench speed` enters the kernels once and patches each policy in every round: a
    # policy that swaps block classes (ATS, EViT, ToMe) must still run its own blocks.
    from iared.reduction.policy import budget_setting

    model = tiny_model()
    x = torch.randn(1, 3, 32, 32)
    budget = DROPPING[budget_setting(name)]

    def logits():
        reset = getattr(model.policy, "reset", None)
        if callable(reset):
            reset()  # random dropping: the same draws every time
        return model(x, execution="compact", return_info=True)

    with torch.no_grad():  # not inference mode: policies built in it would hold inference tensors
        iared.patch(model, name, budget=budget)
        ref, ref_info = logits()
        iared.unpatch(model)
        with cpu_kernels(model, "native"):
            iared.patch(model, name, budget=budget)
            fast, info = logits()
            iared.unpatch(model)
    assert torch.equal(info.block_tokens, ref_info.block_tokens)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def _counting_native(monkeypatch, block_class) -> list[bool]:
    """Record whether each block of `block_class` ran in C++ (True) or fell back to its Python forward (False)."""
    from iared.backbones import kernels

    calls, native_form = [], kernels._NATIVE_SWAPS[block_class]

    def counting(*args):
        out = native_form(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setitem(kernels._NATIVE_SWAPS, block_class, counting)
    return calls


def _swapped_runs(model, x, policy, **settings):
    """(onednn, native, masked reference) logits and infos of `model` under `policy` with `settings`."""
    out = {}
    with torch.no_grad():
        iared.patch(model, policy, **settings)
        out["mask"] = model(x, execution="mask", return_info=True)
        for kernels in ("onednn", "native"):
            with cpu_kernels(model, kernels):
                out[kernels] = model(x, execution="compact", return_info=True)
        iared.unpatch(model)
    return out["onednn"], out["native"], out["mask"]


def _assert_same_run(onednn_run, native_run, masked_run=None):
    """The native run equals the PyTorch one bit for bit, records included (and the masked reference to 1e-5)."""
    (ref, ref_info), (fast, info) = onednn_run, native_run
    assert torch.equal(fast, ref)  # the same ops in the same order
    if masked_run is not None:
        torch.testing.assert_close(fast, masked_run[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(info.block_tokens, ref_info.block_tokens)
    for a, b in zip(ref_info.stages, info.stages):
        assert torch.equal(a.keep, b.keep)
        assert (a.scores is None and b.scores is None) or torch.equal(a.scores, b.scores)  # ToMe scores nothing
        assert a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


def _block_class(policy: str) -> type:
    from iared.reduction.ats import ATSBlock
    from iared.reduction.evit import EViTBlock
    from iared.reduction.tome import ToMeBlock

    return {"ats": ATSBlock, "evit": EViTBlock, "tome": ToMeBlock}[policy]


@needs_native
@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("policy, settings", [
    ("ats", {"rho": 0.4, "select": "sample"}), ("ats", {"rho": 0.4, "select": "topk"}),
    ("evit", {"keep_rate": 0.6, "fuse_token": True}), ("evit", {"keep_rate": 0.6, "fuse_token": False}),
    ("tome", {"r": 6, "prop_attn": True}), ("tome", {"r": 6, "prop_attn": False}),
])
def test_policy_blocks_in_cpp_keep_what_the_python_blocks_keep(monkeypatch, policy, settings, distilled):
    model = tiny_model(distilled=distilled)
    calls = _counting_native(monkeypatch, _block_class(policy))
    ref, fast, masked = _swapped_runs(model, torch.randn(1, 3, 32, 32), policy, **settings)
    assert calls and all(calls)  # every one of the policy's blocks ran in C++
    assert fast[1].block_tokens[0, -1] < fast[1].block_tokens[0, 0]  # tokens really dropped or merged
    _assert_same_run(ref, fast, masked)


@needs_native
@pytest.mark.parametrize("policy, settings", [
    ("ats", {"rho": 0.4, "score": "selfattn"}), ("ats", {"rho": 0.4, "enforce_cls": False}),
    ("ats", {"rho": 0.4, "compound": True}), ("evit", {"keep_rate": 1.0}),
    ("tome", {"r": 0}), ("tome", {"r": 6, "trace_source": True}),
])
def test_policy_blocks_the_cpp_blocks_do_not_compute_run_in_python(monkeypatch, policy, settings):
    model = tiny_model()
    calls = _counting_native(monkeypatch, _block_class(policy))
    ref, fast, _ = _swapped_runs(model, torch.randn(1, 3, 32, 32), policy, **settings)
    assert calls and not any(calls)
    _assert_same_run(ref, fast)


def _calibrated_iared(batch: int = 1):
    """The tiny model under IA-RED², thresholds calibrated to keep about half the tokens."""
    from iared.reduction.budgets import calibrate_knob

    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "drops no token" until calibrated, the next lines
        iared.patch(model, "iared")
    with torch.no_grad():
        calibrate_knob(model, torch.randn(8, 3, 32, 32), 0.5)
    return model, torch.randn(batch, 3, 32, 32)


@needs_native
def test_iared_stage_in_cpp_keeps_what_the_python_stage_keeps():
    model, x = _calibrated_iared()
    with torch.inference_mode():
        masked = model(x, execution="mask")
        with cpu_kernels(model, "onednn"):
            assert "forward" not in vars(model.policy)
            ref, ref_info = model(x, execution="compact", return_info=True)
        with cpu_kernels(model, "native"):
            assert "forward" in vars(model.policy)
            fast, info = model(x, execution="compact", return_info=True)
    assert info.block_tokens[0, -1] < info.block_tokens[0, 0] < model.grid_size + 1  # dropped at every stage
    assert torch.equal(fast, ref)
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
    for a, b in zip(ref_info.stages, info.stages):
        assert torch.equal(a.keep, b.keep) and torch.equal(a.scores, b.scores) and torch.equal(a.entering, b.entering)
        assert torch.equal(a.extras["group"], b.extras["group"])


@needs_native
@pytest.mark.parametrize("case", ["batch", "sample", "mask"])
def test_iared_stages_the_cpp_stage_does_not_cover_run_in_python(monkeypatch, case):
    from iared.reduction.interpreter import IARedPolicy

    model, x = _calibrated_iared(batch=3 if case == "batch" else 1)
    python_calls = []
    plain = IARedPolicy.forward
    monkeypatch.setattr(IARedPolicy, "forward", lambda *a, **k: python_calls.append(1) or plain(*a, **k))
    kw = {"mode": "sample"} if case == "sample" else {"execution": "mask" if case == "mask" else "compact"}
    with torch.inference_mode():
        torch.manual_seed(0)
        ref = model(x, **kw)
        with cpu_kernels(model, "native"):
            python_calls.clear()
            torch.manual_seed(0)
            fast = model(x, **kw)
    assert len(python_calls) == model.policy.groups  # every stage took the Python policy
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
