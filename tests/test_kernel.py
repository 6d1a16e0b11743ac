"""The fused linear + cross-entropy (model.fused_linear_cross_entropy), both implementations, against
F.cross_entropy on materialised logits. The Triton kernel runs here on CPU tensors under Triton's
interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU), so shapes stay small; a
compile-only test builds the same kernel for real GPUs."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import model as M
from conftest import ROOT

IMPLS = ["torch"] + (["triton"] if M.triton is not None else [])
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}


def _reference(hidden, weight, targets, reduction, upstream=None):
    """What everyone else does: materialise fp32 logits and call F.cross_entropy."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = F.cross_entropy(h.float() @ w.float().T, targets, ignore_index=-100, reduction=reduction)
    (loss * upstream).sum().backward() if reduction == "none" else loss.backward()
    return loss.detach(), h.grad, w.grad


def _ours(hidden, weight, targets, reduction, upstream=None, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = M.fused_linear_cross_entropy(h, w, targets, reduction=reduction, **kw)
    (loss * upstream).sum().backward() if reduction == "none" else loss.backward()
    return loss.detach(), h.grad, w.grad


def _problem(N=37, H=16, V=301, dtype=torch.float32, seed=0):
    """Odd vocabulary (not a multiple of any block), rows not a multiple of the chunk, every 3rd row ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (0.5 * torch.randn(V, H, generator=g)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::3] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_matches_cross_entropy(impl, dtype, reduction, chunk):
    hidden, weight, targets = _problem(dtype=dtype)
    up = torch.randn(len(targets), generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    ref = _reference(hidden, weight, targets, reduction, up)
    got = _ours(hidden, weight, targets, reduction, up, chunk_size=chunk, impl=impl)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for name, r, g in zip(("loss", "d hidden", "d weight"), ref, got):
        torch.testing.assert_close(g.float(), r.float(), **TOL[dtype], msg=lambda m: f"{name}: {m}")
    assert got[1][::3].abs().max() == 0  # ignored rows get no gradient
    if reduction == "none":
        assert (got[0][::3] == 0).all()


def test_triton_and_torch_paths_agree():
    if "triton" not in IMPLS:
        pytest.skip("triton not installed")
    hidden, weight, targets = _problem(N=50, V=1000, seed=3)
    for reduction in ("mean", "none"):
        up = torch.rand(50, generator=torch.Generator().manual_seed(4)) if reduction == "none" else None
        a = _ours(hidden, weight, targets, reduction, up, impl="torch", chunk_size=7)
        b = _ours(hidden, weight, targets, reduction, up, impl="triton", chunk_size=64)
        # fp32 sums in another order (chunks of 7 vs 64): a few ulps apart, not 1e-6 (an unseeded draw of `up`
        # once gave 2.0e-6 under xdist); a wrong kernel is off by orders of magnitude more
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_single_row_and_empty(impl):
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    # all ignored: mean is defined as 0.0 (not NaN) with zero gradients, so an all-prompt micro-batch adds nothing
    loss = M.fused_linear_cross_entropy(hidden, weight, torch.full((4,), -100), impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
    hidden.grad = weight.grad = None
    none = M.fused_linear_cross_entropy(hidden, weight, torch.full((4,), -100), reduction="none", impl=impl)
    assert none.shape == (4,) and (none == 0).all() and none.requires_grad
    none.sum().backward()  # zeros for both, not None: a DDP rank with no supervised token still reduces them
    assert hidden.grad.abs().sum() == 0 and weight.grad is not None and weight.grad.abs().sum() == 0
    # an empty batch
    empty = M.fused_linear_cross_entropy(hidden[:0], weight, torch.zeros(0, dtype=torch.long), impl=impl)
    assert empty.item() == 0.0
    # a single supervised row
    t = torch.tensor([3])
    ref, got = _reference(hidden[:1], weight, t, "mean"), _ours(hidden[:1], weight, t, "mean", impl=impl)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_confident_target(impl):
    """p(target) -> 1 in bf16. The reference is what HF does in bf16: logits from a bf16 matmul, upcast,
    F.cross_entropy in fp32. Forming the true-class gradient p - 1 in bf16 (a bug Liger-Kernel once
    had) rounds p to 1 and zeroes it, which this comparison catches. (Under the interpreter bf16
    stores truncate instead of rounding: the tolerance covers one bf16 ulp.)"""
    torch.manual_seed(0)
    weight = torch.randn(50, 16).bfloat16()
    hidden = (weight[torch.randint(0, 50, (8,))].float() * 1.2 + 0.05 * torch.randn(8, 16)).bfloat16()
    targets = (hidden.float() @ weight.float().T).argmax(-1)
    h = hidden.clone().requires_grad_(); w = weight.clone().requires_grad_()
    ref = F.cross_entropy((h @ w.T).float(), targets, reduction="sum")
    ref.backward()
    p_target = torch.softmax((hidden @ weight.T).float(), -1).gather(1, targets[:, None])
    assert (p_target > 0.99).float().mean() > 0.5  # the regime where bf16 rounds p to 1
    got = _ours(hidden, weight, targets, "sum", impl=impl)
    torch.testing.assert_close(got[0], ref.detach(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got[1], h.grad, rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(got[2], w.grad, rtol=2e-2, atol=1e-5)
    # the gradient of a confident row is small but not zero: it must not have been rounded away
    assert (got[1].float().abs().sum(-1) > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_backward_work_under_no_grad(reduction, monkeypatch):
    """Under torch.no_grad (val loss, DPO's reference pass) with inputs that require grad, only the
    forward runs: no logit gradients, no dL/dh and dL/dW matmuls, the same loss."""
    hidden, weight, targets = _problem()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    calls = []
    monkeypatch.setattr(M, "_backprop_chunk", lambda *a: calls.append(1))
    with torch.no_grad():
        got = M.fused_linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=8)
    assert calls == [] and not got.requires_grad
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction=reduction)
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    M.fused_linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=8).sum().backward()
    assert calls  # the same call with grad does the work: the counter sees it


def test_none_under_bf16_autocast_is_as_close_as_sum():
    """reduction='none' recomputes logits in backward: under bf16 autocast it must do so in bf16, as its
    forward did, so its gradients are as close to fp32 F.cross_entropy's as the one-pass 'sum' path's."""
    hidden, weight, targets = _problem(N=64, H=32, V=500, seed=5)
    ref = _reference(hidden, weight, targets, "sum")

    def err(reduction):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = M.fused_linear_cross_entropy(h, w, targets, reduction=reduction, impl="torch")
        loss.sum().backward()
        return [((g - r).norm() / r.norm()).item() for g, r in ((h.grad, ref[1]), (w.grad, ref[2]))]

    e_sum, e_none = err("sum"), err("none")
    assert all(n <= 1.25 * s + 1e-4 for n, s in zip(e_none, e_sum)), (e_none, e_sum)


def test_bad_targets_and_impl():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        M.fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 5, -100]))
    with pytest.raises(ValueError, match="impl"):
        M.fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2]), impl="cuda")
    assert M._pick_impl("auto", torch.device("cpu")) == "torch"


COMPILE = r"""
import sys, triton, triton.runtime.jit
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import model as M
assert isinstance(M._ce_rows_kernel, triton.runtime.jit.JITFunction), type(M._ce_rows_kernel)
for cc in (80, 90):
    for dt in ("bf16", "fp16", "fp32"):
        # the launcher's three calls: forward with gradient, forward only, backward from saved lse with row
        # scales (reduction='none'); BLOCK_V 8192 for vocabularies of 8192 and more, a smaller power of two below
        for has_lse, grad, row_scale, block in ((False, True, False, 8192), (False, False, False, 8192),
                                                (True, True, True, 8192), (False, True, False, 512)):
            sig = dict(logits_ptr="*" + dt, stride="i64", targets_ptr="*i64", lse_ptr="*fp32", loss_ptr="*fp32",
                       row_scale_ptr="*fp32", V="i32", BLOCK_V="constexpr", HAS_LSE="constexpr",
                       WRITE_GRAD="constexpr", HAS_ROW_SCALE="constexpr")
            src = ASTSource(fn=M._ce_rows_kernel, signature=sig, constexprs=dict(
                BLOCK_V=block, HAS_LSE=has_lse, WRITE_GRAD=grad, HAS_ROW_SCALE=row_scale))
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=16))
            assert len(k.asm["cubin"]) > 0
print("compiled")
"""


@pytest.mark.slow
def test_kernel_compiles_for_gpus():
    """The interpreter accepts things a GPU compile rejects; build real cubins for sm80 and sm90 (CPU only,
    in a subprocess without TRITON_INTERPRET, with the signatures _ce_rows_triton launches)."""
    if M.triton is None:
        pytest.skip("triton not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
