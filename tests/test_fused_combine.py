"""The fused Triton combine (weights._fused_combine, CUDA only) builds the bits the addcmul chain
builds. Runs on a GPU with Triton; here, where Triton is installed, under its CPU interpreter
(TRITON_INTERPRET=1), which checks the float32 arithmetic exactly but casts to 16 bits by
truncation rather than rounding, so 16-bit outputs there may differ by one unit in the last place.
Neither is on CI's machine (no GPU, no Triton): these tests are skipped there."""

from __future__ import annotations

import os

import pytest
import torch

from swarm_merge import weights

GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (GPU or INTERPRETED) or weights._fused_kernel() is None,
                                reason="needs a CUDA GPU with Triton, or TRITON_INTERPRET=1 with Triton installed")
DEVICE = "cuda" if GPU else "cpu"


def _reference(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for k in range(x.shape[0]):
        acc.addcmul_(x[k], c[k])
    return acc


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 4095, 4096, 10_001])
def test_the_fused_combine_accumulates_as_addcmul(dtype, k, n):
    gen = torch.Generator().manual_seed(k * 100_000 + n)
    x = (torch.randn(k, n, generator=gen) * 0.05).to(dtype).to(DEVICE)
    c = (torch.randn(k, generator=gen) / k).to(DEVICE)
    acc = torch.empty(n, dtype=torch.float32, device=DEVICE)
    assert weights._fused_combine(x, c, acc)
    assert torch.equal(acc, _reference(x, c))  # float32: the same bits
    out = torch.empty(n, dtype=dtype, device=DEVICE)
    assert weights._fused_combine(x, c, out)
    expected = weights.combine(x, c, out=torch.empty(n, dtype=dtype, device=DEVICE)) if GPU else \
        _reference(x, c).to(dtype)
    if GPU:
        assert torch.equal(out, expected)
    else:  # the interpreter truncates: at most one unit in the last place
        ulp = torch.finfo(dtype).eps * expected.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((out.float() - expected.float()).abs() <= ulp).all()


def test_a_chunk_of_a_wider_tensor_is_combined_in_place():
    wide = (torch.randn(4, 9000) * 0.05).to(torch.bfloat16).to(DEVICE)
    c = torch.tensor([0.4, 0.3, 0.2, 0.1], device=DEVICE)
    acc = torch.empty(5000, device=DEVICE)
    assert weights._fused_combine(wide[:, 100:5100], c, acc)
    assert torch.equal(acc, _reference(wide[:, 100:5100].contiguous(), c))


@pytest.mark.skipif(not GPU, reason="the GPU path of combine")
def test_combine_on_a_gpu_equals_combine_on_the_cpu():
    x = (torch.randn(4, 100_000) * 0.05).to(torch.bfloat16)
    c = torch.tensor([0.7, -0.2, 0.4, 0.1])
    cpu = weights.combine(x, c, out=torch.empty(100_000, dtype=torch.bfloat16))
    gpu = weights.combine(x.cuda(), c.cuda(), out=torch.empty(100_000, dtype=torch.bfloat16, device="cuda"))
    assert torch.equal(gpu.cpu(), cpu)
