"""Each compressor, alone and under error feedback, equals a plain-PyTorch reference written here. No Ray.

The references follow the definitions in ``sgd_dist.core.compression``'s docstrings (the wire format, the
keyed draws) without calling the module's helpers: bit-equality holds where the reference does the same
float operations in the same order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sgd_dist.core.compression import (
    DOWN,
    KINDS,
    Compressor,
    Key,
    RandK,
    TopK,
    build_compressor,
    compress_with_feedback,
    decompress,
)

DTYPES = [torch.float32, torch.float64]


def keyed(seed: int, worker: int, step: int, channel: int = 0) -> torch.Generator:
    """The documented key: numpy's SeedSequence over (seed, stream 4, channel, worker, step)."""
    state = np.random.SeedSequence([seed, 4, channel, worker, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def ref_int8(x: torch.Tensor, gen: torch.Generator, bucket: int = 512) -> torch.Tensor:
    """QSGD with 127 levels a side: each bucket's scale its peak |x| rounded up to float32, rounding at random."""
    draw = torch.rand(x.numel(), generator=gen, dtype=x.dtype)
    out = torch.empty_like(x)
    for start in range(0, x.numel(), bucket):
        chunk = x[start : start + bucket]
        peak = chunk.abs().max().item()
        scale = np.float32(peak)
        if float(scale) < peak:
            scale = np.nextafter(scale, np.float32(np.inf))
        s = torch.tensor(float(scale), dtype=x.dtype)
        u = chunk.abs() / (s if float(scale) > 0 else 1.0) * 127
        level = u.floor() + (draw[start : start + bucket] < u - u.floor()).to(x.dtype)
        out[start : start + bucket] = (level * chunk.sign()) * s / 127
    return out


def ref_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |x_i|, a tie going to the lower index (a Python sort on (-|x_i|, i))."""
    order = sorted(range(x.numel()), key=lambda i: (-abs(x[i].item()), i))[:k]
    out = torch.zeros_like(x)
    out[order] = x[order]
    return out


def ref_randk(x: torch.Tensor, gen: torch.Generator, k: int, scaled: bool) -> torch.Tensor:
    chosen = torch.randperm(x.numel(), generator=gen)[:k]
    out = torch.zeros_like(x)
    out[chosen] = x[chosen] * (x.numel() / k) if scaled else x[chosen]
    return out


def reference(kind: str, x: torch.Tensor, key: tuple, *, ratio: float = 0.1, ef: bool = False) -> torch.Tensor:
    """What the compressor of ``kind`` delivers for x, written from the definitions."""
    k = math.ceil(round(ratio * x.numel(), 9))
    if kind == "fp16":
        return x.to(torch.float16).to(x.dtype)
    if kind == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if kind == "int8":
        return ref_int8(x, keyed(*key))
    if kind == "topk":
        return ref_topk(x, k)
    if kind == "randk":
        return ref_randk(x, keyed(*key), k, scaled=not ef)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_equals_its_reference(kind, dtype):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x[::7] *= 40  # magnitudes spread over buckets, so the int8 scales differ
    payload = build_compressor(kind, ratio=0.1).compress(x, Key(3, 1, 5))
    out = decompress(payload)
    assert out.dtype == dtype
    assert torch.equal(out, reference(kind, x, (3, 1, 5)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_levels_and_scales_are_what_travels(dtype):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2), dtype=dtype)
    payload = build_compressor("int8").compress(x, Key(0, 0, 0))
    assert payload.values.dtype == torch.int8 and payload.values.abs().max() == 127
    assert payload.scales.dtype == torch.float32 and payload.scales.shape == (2,)  # 512 + a partial 488
    for scale, chunk in zip(payload.scales, (x[:512], x[512:]), strict=True):
        assert scale.item() >= chunk.abs().max().item()  # rounded up: no level past 127


def test_topk_breaks_ties_by_the_lower_index():
    x = torch.tensor([0.5, -2.0, 1.0, 2.0, -1.0, 1.0, 0.25, -1.0])
    payload = TopK(0.5).compress(x, Key(0, 0, 0))  # |x| = 2 at 1 and 3; the last two of 4 among 1.0's
    assert payload.indices.tolist() == [1, 2, 3, 4] and payload.indices.dtype == torch.int32
    assert payload.values.tolist() == [-2.0, 1.0, 2.0, -1.0]
    rounded = torch.randn(1000, generator=torch.Generator().manual_seed(3)).mul(4).round()  # many ties
    assert torch.equal(decompress(TopK(0.05).compress(rounded, Key(0, 0, 0))), ref_topk(rounded, 50))


def test_none_is_the_vector_itself():
    x = torch.randn(10, dtype=torch.float64)
    payload = Compressor().compress(x, Key(0, 0, 0))
    assert decompress(payload) is x and payload.nbytes == 80


def least_squares(seed: int = 0, n: int = 64, d: int = 40):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64)
    return X, y


@pytest.mark.parametrize("ef", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_compressed_sgd_iterates_equal_the_reference(kind, ef):
    """w <- w - lr * C(g + e), e <- (g + e) - C(g + e) (e = 0 without feedback), over 12 steps."""
    X, y = least_squares()
    compressor = build_compressor(kind, ratio=0.1, error_feedback=ef)
    w, w_ref = torch.zeros(40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64)
    residual, e_ref = None, torch.zeros(40, dtype=torch.float64)
    for step in range(12):
        grad = (2 / 64) * ((X @ w - y) @ X)
        if ef:
            payload, residual = compress_with_feedback(compressor, grad, residual, Key(9, 2, step))
        else:
            payload = compressor.compress(grad, Key(9, 2, step))
        w = w - 0.05 * decompress(payload)

        p = (2 / 64) * ((X @ w_ref - y) @ X) + (e_ref if ef else 0)
        c = reference(kind, p, (9, 2, step), ef=ef)
        e_ref = p - c
        w_ref = w_ref - 0.05 * c
        assert torch.equal(w, w_ref), step
        if ef:
            assert torch.equal(residual, e_ref), step
    assert not torch.equal(w, torch.zeros(40, dtype=torch.float64))


def test_the_residual_is_what_compression_dropped_and_it_changes_the_next_choice():
    X, y = least_squares()
    grad = (2 / 64) * ((X @ torch.zeros(40, dtype=torch.float64) - y) @ X)
    topk = TopK(0.1)
    first, e = compress_with_feedback(topk, grad, None, Key(0, 0, 0))
    second, _ = compress_with_feedback(topk, grad, e, Key(0, 0, 1))
    assert torch.equal(e, grad - decompress(first)) and e.norm() > 0
    assert not torch.equal(second.indices, topk.compress(grad, Key(0, 0, 1)).indices)


@pytest.mark.parametrize("kind", ["int8", "randk"])
def test_int8_and_scaled_randk_are_unbiased(kind):
    """The mean over N keys is within 5 standard errors of x in every coordinate.

    int8: a level is floor(u) or floor(u) + 1, variance <= 1/4, so the error bound is (s / 127) / (2 sqrt N).
    randk (k = 5 of d = 50): x_i d/k with probability k/d, variance x_i^2 (d/k - 1).
    """
    x = torch.randn(50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    n = 4000
    compressor = build_compressor(kind, ratio=0.1)
    mean = sum(decompress(compressor.compress(x, Key(1, 0, step))) for step in range(n)) / n
    if kind == "int8":
        std = x.abs().max() / 127 / 2 / math.sqrt(n) * torch.ones_like(x)
    else:
        std = x.abs() * math.sqrt((50 / 5 - 1) / n)
    assert ((mean - x).abs() <= 5 * std).all(), ((mean - x).abs() / std).max()


@pytest.mark.parametrize("kind", ["int8", "randk"])
def test_the_draw_is_keyed_by_seed_worker_step_and_channel(kind):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    compressor = build_compressor(kind, ratio=0.01)
    base = compressor.compress(x, Key(1, 2, 3))
    again = compressor.compress(x, Key(1, 2, 3))
    assert torch.equal(base.values, again.values)
    assert base.indices is None or torch.equal(base.indices, again.indices)
    for other in (Key(2, 2, 3), Key(1, 0, 3), Key(1, 2, 4), Key(1, 2, 3, DOWN)):
        assert not torch.equal(decompress(compressor.compress(x, other)), decompress(base)), other


@pytest.mark.parametrize("kind", ["none", "fp16", "bf16", "topk"])
def test_the_kinds_that_draw_nothing_ignore_the_key(kind):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(6))
    compressor = build_compressor(kind, ratio=0.01)
    first, other = (decompress(compressor.compress(x, key)) for key in (Key(1, 2, 3), Key(4, 5, 6, DOWN)))
    assert torch.equal(first, other)


@pytest.mark.parametrize(
    "kind, dtype, nbytes",
    [
        ("none", torch.float32, 40_000),
        ("none", torch.float64, 80_000),
        ("fp16", torch.float32, 20_000 + 16),
        ("bf16", torch.float64, 20_000 + 16),
        ("int8", torch.float32, 10_000 + 20 * 4 + 16),  # ceil(10000 / 512) = 20 float32 scales
        ("int8", torch.float64, 10_000 + 20 * 4 + 16),
        ("topk", torch.float32, 100 * 4 + 100 * 4 + 16),  # 100 float32 values, 100 int32 indices, the header
        ("topk", torch.float64, 100 * 8 + 100 * 4 + 16),
        ("randk", torch.float32, 100 * 4 + 100 * 4 + 16),
    ],
)
def test_nbytes_is_the_documented_wire_size(kind, dtype, nbytes):
    x = torch.randn(10_000, dtype=dtype)
    assert build_compressor(kind, ratio=0.01).compress(x, Key(0, 0, 0)).nbytes == nbytes


@pytest.mark.parametrize("ratio, d, k", [(0.07, 100, 7), (0.333, 10, 4), (1e-5, 1000, 1), (1.0, 30, 30)])
def test_k_is_ceil_of_the_ratio_as_written_times_d(ratio, d, k):
    x = torch.randn(d)
    assert TopK(ratio).compress(x, Key(0, 0, 0)).values.numel() == k
    assert RandK(ratio).compress(x, Key(0, 0, 0)).indices.numel() == k


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.0001, 2, math.nan, math.inf, None, "0.1", True])
@pytest.mark.parametrize("kind", ["topk", "randk"])
def test_a_bad_ratio_is_a_value_error_naming_the_field(kind, ratio):
    with pytest.raises(ValueError, match=r"compression\.ratio must be in \(0, 1\]"):
        build_compressor(kind, ratio=ratio)


def test_an_unknown_kind_names_the_field_and_the_kinds():
    with pytest.raises(ValueError, match="compression.kind must be one of none, fp16, bf16, int8, topk, randk"):
        build_compressor("powersgd")


def test_randk_under_error_feedback_is_unscaled_because_scaled_diverges():
    """Scaled rand-k is no contraction: fed back, its residual grows geometrically; unscaled stays bounded."""
    g = torch.randn(100, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert not build_compressor("randk", ratio=0.05, error_feedback=True).scaled
    norms = {}
    for scaled in (True, False):
        residual = None
        for step in range(60):
            _, residual = compress_with_feedback(RandK(0.05, scaled=scaled), g, residual, Key(0, 0, step))
        norms[scaled] = residual.norm().item()
    assert norms[False] < 100 * g.norm().item() < norms[True], norms


def test_topk_one_percent_stalls_without_error_feedback_and_gets_close_with_it():
    """Plain SGD on noiseless least squares (4,000 x 1,000 normal rows, batches of 250 in turn, lr 0.01).

    Relative gap f(w) / f(0) after 300 steps, as measured: uncompressed 7.0e-4 (9.4e-3 after 150); top-k
    1 % alone 0.50 (0.36 after 600: it moves 10 coordinates a step, the rest of each gradient lost); top-k
    1 % with error feedback 3.8e-3, under the gap the uncompressed run had at half the updates.
    """
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 1000, generator=g, dtype=torch.float64)
    y = X @ torch.randn(1000, generator=g, dtype=torch.float64)

    def gap_after(steps, compressor, ef):
        w, residual = torch.zeros(1000, dtype=torch.float64), None
        for step in range(steps):
            rows = slice(step % 16 * 250, (step % 16 + 1) * 250)
            grad = (2 / 250) * ((X[rows] @ w - y[rows]) @ X[rows])
            if ef:
                payload, residual = compress_with_feedback(compressor, grad, residual, Key(0, 0, step))
            else:
                payload = compressor.compress(grad, Key(0, 0, step))
            w -= 0.01 * decompress(payload)
        return ((X @ w - y) ** 2).mean().item() / (y**2).mean().item()

    half_uncompressed = gap_after(150, Compressor(), ef=False)
    without_ef = gap_after(300, TopK(0.01), ef=False)
    with_ef = gap_after(300, TopK(0.01), ef=True)
    assert without_ef > 0.2, without_ef
    assert with_ef < 0.02 and with_ef < half_uncompressed, (with_ef, half_uncompressed)
