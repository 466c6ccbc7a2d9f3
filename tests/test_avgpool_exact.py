"""Average pooling is the exact rounded mean (issue 24): y = R(s / k) for every window sum s that k
codes of a format can add up to, k in {4, 9, 16, 49}, every rounding mode, signed and unsigned
inputs.  Checked exhaustively against the definition of R (and Python's Fractions) in
``fixedpoint.div_round``, the avgpool2d record, the C golden model's ``bll_div_round`` and a whole
generated C model; and hls4ml's arithmetic with the accumulator of the precision table gives the
same mean.  Before issue 24 the record multiplied by round(2**30 / 9) = 119304647 (rounded down),
so under floor nine codes of 9677 averaged to 9676."""
import math
import subprocess
from fractions import Fraction

import numpy as np
import pytest

from bll_ref import layers as L
from bll_ref.fixedpoint import ROUNDING_MODES, IntegerModel, QFormat, compile_integer, div_round, round_shift
from bll_ref.fixedpoint import records as R
from exporters import c_golden, c_header
from exporters.c_header import compile_c, find_c_compiler, write_c
from exporters.hls4ml_tb import avgpool_extra_frac

KERNELS = {4: (2, 2), 9: (3, 3), 16: (4, 4), 49: (7, 7)}


def is_rounded(q, s, k, mode):
    """True where q = R(s / k), from R's definition alone: floor: q <= s/k < q + 1; nearest (half
    up): q - 1/2 <= s/k < q + 1/2; nearest_even: |s/k - q| < 1/2, or = 1/2 with q even.  Each
    condition holds for exactly one integer q."""
    d = 2 * (s - q * k)                       # 2k (s/k - q), exact in int64
    if mode == "floor":
        return (0 <= d) & (d < 2 * k)
    if mode == "nearest":
        return (-k <= d) & (d < k)
    return (np.abs(d) < k) | ((np.abs(d) == k) & (q % 2 == 0))


def fraction_rounded(s, k, mode):
    x = Fraction(s, k)
    return math.floor(x) if mode == "floor" else math.floor(x + Fraction(1, 2)) if mode == "nearest" else round(x)


def all_sums(k, width, signed):
    """Every sum of k codes of a width-bit format (signed or unsigned)."""
    f = QFormat(width, 0, signed)
    return np.arange(k * f.min_code, k * f.max_code + 1, dtype=np.int64)


def windows_with_sums(sums, kernel, dtype):
    """(N, 1, kh, kw) codes whose window n adds up to sums[n], every code within [floor(s/k), floor(s/k) + 1]."""
    kh, kw = kernel
    k = kh * kw
    base = np.floor_divide(sums, k)
    extra = (np.arange(k)[None, :] < (sums - base * k)[:, None]).astype(np.int64)
    return (base[:, None] + extra).reshape(-1, 1, kh, kw).astype(dtype)


def test_issue_example_nine_codes_of_9677_average_to_9677_under_floor():
    x = np.full((1, 1, 3, 3), 9677, dtype=np.int64)
    im = IntegerModel([R.Input(name="input", inputs=(), out_fmt=QFormat(16, 0, rounding="floor"), shape=(1, 3, 3)),
                       R.AvgPool2d(name="0", inputs=(0,), out_fmt=QFormat(16, 0, rounding="floor"), kernel_size=3,
                                   stride=3, recip=119304647, recip_shift=30)])
    assert im.run(x)[-1].item() == 9677
    assert int(round_shift(np.array([9 * 9677 * 119304647]), 30, "floor")[0]) == 9676    # the old reciprocal
    m = compile_integer(L.Sequential(L.AvgPool2d(3)), x / 2.0 ** 2, width=16, rounding="floor",
                        input_fmt=QFormat(16, 2, rounding="floor"))
    assert m.run(x)[-1].item() == 9677


@pytest.mark.parametrize("k", sorted(KERNELS))
def test_div_round_is_exact_for_every_sum_of_16_bit_codes(k):
    """Signed and unsigned 16-bit codes: every narrower format's sums are among these."""
    s = np.arange(k * -(1 << 15), k * ((1 << 16) - 1) + 1, dtype=np.int64)
    for mode in ROUNDING_MODES:
        q = div_round(s, k, mode)
        bad = s[~is_rounded(q, s, k, mode)]
        assert bad.size == 0, (mode, bad[:5])
    assert np.array_equal(div_round(s, k, "floor"), s // k)


@pytest.mark.parametrize("width", [2, 8])
def test_div_round_equals_python_fractions_for_every_sum(width):
    for k in KERNELS:
        for signed in (True, False):
            s = all_sums(k, width, signed)
            for mode in ROUNDING_MODES:
                want = [fraction_rounded(int(v), k, mode) for v in s]
                assert div_round(s, k, mode).tolist() == want, (k, signed, mode)


def test_div_round_is_exact_at_32_bits_around_every_kind_of_breakpoint():
    """32-bit formats: sums up to 49 * (2**32 - 1), sampled at multiples of k, halves and their
    neighbours over the whole range, plus random sums."""
    rng = np.random.default_rng(24)
    for k in KERNELS:
        lo, hi = k * -(1 << 31), k * ((1 << 32) - 1)
        q0 = rng.integers(lo // k, hi // k, size=4000)
        s = np.concatenate([q0 * k + d for d in (-1, 0, 1, k // 2 - 1, k // 2, k // 2 + 1, (k + 1) // 2)]
                           + [rng.integers(lo, hi + 1, size=20000), [lo, hi, lo + 1, hi - 1, 0, -1, 1]])
        s = s[(s >= lo) & (s <= hi)]
        for mode in ROUNDING_MODES:
            q = div_round(s, k, mode)
            assert is_rounded(q, s, k, mode).all(), (k, mode)
            assert [int(v) for v in q[:50]] == [fraction_rounded(int(v), k, mode) for v in s[:50]]
    with pytest.raises(ValueError, match="positive integer"):
        div_round(np.array([1]), 0)
    with pytest.raises(ValueError, match="rounding must be one of"):
        div_round(np.array([1]), 9, "up")


@pytest.mark.parametrize("width,signed", [(4, True), (4, False), (8, True), (8, False), (12, True)])
def test_avgpool_record_gives_the_rounded_mean_of_every_window_sum(width, signed):
    for k, kernel in KERNELS.items():
        if width == 12 and k > 9:
            continue                                   # (2**12 * 49 windows of 49 codes: covered by div_round)
        s = all_sums(k, width, signed)
        for mode in ROUNDING_MODES:
            fmt = QFormat(width, width // 2, signed, mode)
            x = windows_with_sums(s, kernel, fmt.code_dtype)
            assert x.min() >= fmt.min_code and x.max() <= fmt.max_code
            rec = R.AvgPool2d(name="p", inputs=(0,), out_fmt=fmt, kernel_size=kernel, stride=kernel,
                              recip=((1 << 31) // k + 1) // 2, recip_shift=30)
            y = rec.run([x.astype(np.int64)], [fmt]).reshape(-1).astype(np.int64)
            assert is_rounded(y, s, k, mode).all(), (k, mode)


def test_hls4ml_accumulator_with_the_extra_fractional_bits_gives_the_rounded_mean():
    """hls4ml's nnet::avg: sum in accum_t, ``y /= k`` (ap_fixed division: the codes at accum's frac
    divided, truncated toward zero), then y converted to the result type with its rounding.  With
    e = ceil(log2(2k)) extra fractional bits that is R(s/k) for every 16-bit sum; with none it is not."""
    for k in KERNELS:
        s = np.arange(k * -(1 << 15), k * ((1 << 16) - 1) + 1, dtype=np.int64)
        e = avgpool_extra_frac(k)
        assert (1 << e) >= 2 * k > (1 << (e - 1))
        a = s << e
        q = np.sign(a) * (np.abs(a) // k)
        for mode in ROUNDING_MODES:
            assert is_rounded(round_shift(q, e, mode), s, k, mode).all(), (k, mode)
        q0 = np.sign(s) * (np.abs(s) // k)                # no extra bits: the mean truncated
        assert not is_rounded(q0, s, k, "floor").all()


@pytest.fixture(scope="module")
def cc():
    found = find_c_compiler()
    if found is None:
        pytest.skip("no C compiler ($CC, cc, gcc or clang) on PATH; install one (e.g. apt-get install gcc)")
    return found


_C_MAIN = """
int main(int argc, char **argv)
{
    int64_t k = atoll(argv[1]), lo = atoll(argv[2]), hi = atoll(argv[3]), s, i;
    int mode = atoi(argv[4]);
    uint64_t h = 0;
    long bad = 0;
    (void)argc;
    for (s = lo, i = 0; s <= hi; ++s, ++i) {
        int64_t q = bll_div_round(s, k, mode), d = 2 * (s - q * k);
        int ok = mode == BLL_FLOOR ? (d >= 0 && d < 2 * k)
               : mode == BLL_NEAREST ? (d >= -k && d < k)
               : (d > -k && d < k) || ((d == k || d == -k) && (q % 2 == 0));
        bad += !ok;
        h += (uint64_t)q * (uint64_t)(2 * i + 1);
    }
    printf("%ld %llu\\n", bad, (unsigned long long)h);
    return 0;
}
"""


def test_c_div_round_is_exact_for_every_sum_of_16_bit_codes_and_equals_python(tmp_path, cc):
    src = ("#include <stdint.h>\n#include <stdio.h>\n#include <stdlib.h>\n"
           "#define BLL_FLOOR 0\n#define BLL_NEAREST 1\n#define BLL_NEAREST_EVEN 2\n"
           + c_golden._C_DIV_ROUND + _C_MAIN)
    (tmp_path / "d.c").write_text(src)
    exe = tmp_path / "d"
    subprocess.run([*cc.split(), *c_header.CFLAGS, "-o", str(exe), str(tmp_path / "d.c")], check=True, timeout=120)
    for k in KERNELS:
        lo, hi = k * -(1 << 15), k * ((1 << 16) - 1)
        s = np.arange(lo, hi + 1, dtype=np.int64)
        weights = (2 * np.arange(s.size, dtype=np.uint64) + 1)
        for m, mode in enumerate(ROUNDING_MODES):
            out = subprocess.run([str(exe), str(k), str(lo), str(hi), str(m)], capture_output=True, text=True,
                                 check=True, timeout=120).stdout.split()
            h = int((div_round(s, k, mode).astype(np.uint64) * weights).sum(dtype=np.uint64))
            assert out == ["0", str(h)], (k, mode)


@pytest.mark.parametrize("k", [9, 49])
@pytest.mark.parametrize("signed", [True, False])
def test_generated_c_model_averages_every_window_sum_like_python(tmp_path, cc, k, signed):
    """A model of just an avgpool2d record (no other kind: the C file needs only overflow and
    div_round), every sum of k 6-bit codes, each rounding mode."""
    kernel = KERNELS[k]
    s = all_sums(k, 6, signed)
    for mode in ROUNDING_MODES:
        fmt = QFormat(6, 2, signed, mode)
        im = IntegerModel([R.Input(name="input", inputs=(), out_fmt=fmt, shape=(1,) + kernel),
                           R.AvgPool2d(name="0", inputs=(0,), out_fmt=fmt, kernel_size=kernel, stride=kernel,
                                       recip=((1 << 31) // k + 1) // 2, recip_shift=30)])
        x = windows_with_sums(s, kernel, fmt.code_dtype)
        d = tmp_path / mode
        src = write_c(im, d, name="avg", test_inputs=x[:2])["source"].read_text()
        assert "bll_div_round(int64_t" in src and "bll_round_shift(int64_t" not in src
        exe = compile_c(d, name="avg", cc=cc)
        inp = d / "codes.txt"
        inp.write_text(f"{len(x)}\n" + "\n".join(" ".join(map(str, v.ravel())) for v in x) + "\n")
        res = subprocess.run([str(exe), "--run", str(inp)], capture_output=True, text=True, timeout=60, check=True)
        got = np.array([int(t.split()[3]) for t in res.stdout.splitlines() if t.split()[2] == "1"])
        assert got.size == s.size and is_rounded(got, s, k, mode).all(), mode
        assert np.array_equal(got, im.run(x)[-1].reshape(-1))
