"""A decode step's own CPU kernels (delta_kernels.c; kernels.decode_kernels):

- the dense products (linear_bf16): the same sums as torch's GEMM within bf16
  rounding over every shape edge (K not a multiple of 32, odd N, one row to the most
  the engine gives it, strided rows, a bias, ranges split over threads), and torch's
  GEMM wherever the kernel is not the right tool;
- the decode attention (decode_attention_bf16): SDPA's result over a gathered,
  masked batch within bf16 rounding, for any head size up to 256, grouped heads, a
  window, rows in any order of slots, and the other rows of the output untouched;
- a bf16 step with both, on a family of each kind: logits within rounding of torch's
  ops and the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltastore.testing import family_model, make_model, tiny_tokenizer
from server.engine.job import Job, SamplingParams
from server.engine.kernels import DENSE_KERNEL_ROWS, KernelUnavailable, cpu, decode_kernels
from server.engine.sequence import Sequence
from tests.server.engine.stepping import forward, nan_runner

CPU = torch.device("cpu")
_THREADS = torch.get_num_threads()
built = pytest.mark.skipif(
    not cpu.linear_available(), reason="this machine's kernel build has no AVX512-BF16 path"
)


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The exact sums (fp64) of the bf16 inputs."""
    y = x.double() @ w.double().T
    return y + bias.double() if bias is not None else y


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    assert y.dtype == torch.bfloat16 and y.shape == (x.shape[0], w.shape[0])
    want = _reference(x, w, bias)
    # within one bf16 rounding of the exact sum (plus fp32 summation error)
    err = (y.double() - want).abs()
    bound = want.abs() * 2.0**-8 + 1e-5 * (x.double().abs() @ w.double().abs().T)
    assert bool((err <= bound + 1e-30).all()), float((err - bound).max())
    torch.testing.assert_close(y, F.linear(x, w, bias), rtol=2**-7, atol=1e-3)


@built
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 16, 17, DENSE_KERNEL_ROWS])
@pytest.mark.parametrize("n,k", [(1, 32), (2, 33), (5, 64), (63, 100), (257, 31), (130, 576)])
def test_linear_is_the_gemm_within_rounding(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
    _check(cpu.linear(x, w), x, w, None)
    bias = torch.randn(n, generator=g).bfloat16()
    _check(cpu.linear(x, w, bias), x, w, bias)


@built
def test_linear_reads_strided_rows_and_splits_over_threads():
    """Rows of x and w with a stride past their width (views of wider tensors, as the
    runner's stacked products are), and a product large enough for the thread team."""
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(12, 700, generator=g).bfloat16()
    ws = (torch.randn(1029, 700, generator=g) * 0.05).bfloat16()
    x, w = xs[:, 3:579], ws[:, 100:676]  # stride 700, width 576
    assert x.stride(0) == 700 and w.stride(0) == 700
    _check(cpu.linear(x, w), x, w, None)
    torch.set_num_threads(1)  # one thread takes the whole range
    try:
        _check(cpu.linear(x, w), x, w, None)
    finally:
        torch.set_num_threads(_THREADS)


@built
def test_linear_refuses_what_it_does_not_compute():
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(TypeError, match="bf16"):
        cpu.linear(x.float(), torch.randn(3, 64))
    with pytest.raises(ValueError, match="columns"):
        cpu.linear(x, torch.randn(3, 65).bfloat16())
    with pytest.raises(ValueError, match="bias"):
        cpu.linear(x, torch.randn(3, 64).bfloat16(), torch.randn(4).bfloat16())
    with pytest.raises(ValueError, match="unit stride"):
        cpu.linear(x, torch.randn(64, 3).bfloat16().T)


def test_the_portable_build_leaves_dense_products_to_torch():
    try:
        cpu.load_kernels(portable=True)
    except KernelUnavailable:
        pytest.skip("no C compiler")
    assert not cpu.linear_available(portable=True)
    with pytest.raises(KernelUnavailable, match="dense bf16"):
        cpu.linear(torch.randn(2, 64).bfloat16(), torch.randn(3, 64).bfloat16(), portable=True)


def test_decode_kernels_are_torch_where_they_do_not_apply():
    with pytest.raises(ValueError, match="auto or torch"):
        decode_kernels("native", CPU, torch.bfloat16)
    assert decode_kernels("torch", CPU, torch.bfloat16) == (F.linear, None)
    assert decode_kernels("auto", CPU, torch.float32) == (F.linear, None)
    assert decode_kernels("auto", torch.device("cuda"), torch.bfloat16) == (F.linear, None)
    linear, attend = decode_kernels("auto", CPU, torch.bfloat16)
    assert (linear is F.linear) == (attend is None) == (not cpu.linear_available())


@built
def test_the_dense_kernel_takes_only_few_rows(monkeypatch):
    linear, _ = decode_kernels("auto", CPU, torch.bfloat16)
    calls = []
    real = cpu.linear

    def counted(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, w, bias)

    monkeypatch.setattr(cpu, "linear", counted)
    w = torch.randn(40, 64).bfloat16()
    for m in (1, DENSE_KERNEL_ROWS, DENSE_KERNEL_ROWS + 1):
        x = torch.randn(m, 64).bfloat16()
        torch.testing.assert_close(linear(x, w, None), F.linear(x, w), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(linear(x.float(), w.float(), None), F.linear(x.float(), w.float()))
    x = torch.randn(64, 3).bfloat16().T  # columns not contiguous: torch's GEMM
    torch.testing.assert_close(linear(x, w, None), F.linear(x, w), rtol=2**-7, atol=1e-3)
    assert calls == [1, DENSE_KERNEL_ROWS]


def _sdpa_reference(q, k, v, idx, slots, lens, window, scale):
    """The runner's SDPA path: the rows' slots gathered and masked to each row's length."""
    b, hkv, d = idx.numel(), k.shape[1], k.shape[3]
    length = int(lens.max())
    qd = q.index_select(0, idx).view(b, hkv, q.shape[1] // hkv, d).float()
    kd, vd = k[slots, :, :length].float(), v[slots, :, :length].float()
    at = torch.arange(length)[None]
    keep = at < lens[:, None]
    if window is not None:
        keep &= at >= lens[:, None] - window
    od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=keep[:, None, None], scale=scale)
    return od.reshape(b, -1)


@built
@pytest.mark.parametrize("hkv,g,d", [(3, 3, 64), (2, 4, 128), (1, 1, 40), (2, 2, 256), (4, 16, 32)])
@pytest.mark.parametrize("window", [None, 17])
def test_decode_attention_is_sdpa_within_rounding(hkv, g, d, window):
    gen = torch.Generator().manual_seed(hkv * 100 + g * 10 + d)
    slots_n, max_len = 7, 90
    k = torch.randn(slots_n, hkv, max_len, d, generator=gen).bfloat16()
    v = torch.randn(slots_n, hkv, max_len, d, generator=gen).bfloat16()
    n = 9  # packed rows; 5 of them decode, the others (a prompt chunk's) are left alone
    q = torch.randn(n, hkv * g, d, generator=gen).bfloat16()
    idx = torch.tensor([0, 2, 3, 6, 8])
    slots = torch.tensor([4, 0, 6, 2, 5])
    lens = torch.tensor([1, 90, 16, 17, 53])  # one position, the whole slot, window edges
    out = torch.full((n, hkv * g * d), 7.0).bfloat16()
    cpu.decode_attention_(out, q, k, v, idx, slots, lens, window, d**-0.5)
    want = _sdpa_reference(q, k, v, idx, slots, lens, window, d**-0.5)
    torch.testing.assert_close(out[idx].float(), want, rtol=2**-7, atol=2e-3)
    rest = [i for i in range(n) if i not in idx.tolist()]
    assert bool((out[rest] == 7.0).all())


@built
def test_decode_attention_refuses_what_it_does_not_take():
    k = torch.zeros(2, 1, 8, 64).bfloat16()
    idx = slots = lens = torch.zeros(1, dtype=torch.int64)
    out = torch.zeros(1, 64).bfloat16()
    with pytest.raises(TypeError, match="bf16"):
        cpu.decode_attention_(out, torch.zeros(1, 1, 64), k, k, idx, slots, lens, None, 1.0)
    with pytest.raises(ValueError, match="contiguous heads"):
        q = torch.zeros(1, 64, 1).bfloat16().transpose(1, 2)
        cpu.decode_attention_(out, q, k, k, idx, slots, lens, None, 1.0)
    with pytest.raises(ValueError, match="head_dim <= 256"):
        big = torch.zeros(2, 1, 8, 320).bfloat16()
        q = torch.zeros(1, 1, 320).bfloat16()
        cpu.decode_attention_(
            torch.zeros(1, 320).bfloat16(), q, big, big, idx, slots, lens, None, 1.0
        )
    with pytest.raises(TypeError, match="int64"):
        q = torch.zeros(1, 1, 64).bfloat16()
        cpu.decode_attention_(out, q, k, k, idx.int(), slots, lens, None, 1.0)


@built
@pytest.mark.parametrize(
    "kind", ["llama-tied", "llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]
)
def test_a_bf16_step_by_the_kernels_is_torchs_step(kind):
    """A prompt chunk, then decode rows beside another chunk, on a bf16 model: the
    logits by the kernels are within bf16 rounding of those by torch's GEMM and SDPA,
    and the greedy tokens are the same (mistral: a window of 5 positions; qwen2: q/k/v
    biases, separate products; qwen3: q/k norms, rotated apart; gemma2: soft-capped
    attention, which the kernel leaves to SDPA; phi3: fused checkpoint products, half
    of each head rotated)."""
    model = _model(kind).to(dtype=torch.bfloat16)
    tok = tiny_tokenizer()
    out = {}
    for name, kernels in (
        ("torch", (F.linear, None)),
        ("kernels", decode_kernels("auto", CPU, torch.bfloat16)),
    ):
        runner, how = nan_runner(model, 64, *kernels)
        assert (runner.attend is not None) == (name == "kernels" and kind != "gemma2")

        def seq(prompt: list[int], slot: int) -> Sequence:
            job = Job(None, prompt, SamplingParams(4, temperature=0.0), lambda k, p: None)
            return Sequence(job, slot, tok, {256})

        a, b = seq(list(range(5, 18)), 0), seq([40, 41, 42], 1)
        forward(runner, how, [], [(a, 9)])
        a.prefilled = 9
        first = forward(runner, how, [], [(a, 4), (b, 3)])
        a.prefilled, b.prefilled = 13, 3
        a.ids.append(18)
        b.ids.append(43)
        out[name] = (first, forward(runner, how, [a, b], []))
    for want, got in zip(out["torch"], out["kernels"], strict=True):
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.05 * scale)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def _model(kind: str) -> torch.nn.Module:
    if kind.startswith("llama"):
        return make_model(3, tie_word_embeddings=kind == "llama-tied")
    return family_model(kind, seed=3)
