"""Metrics against scikit-image, moving variance against eq. 19 (WMV) and Wang et al.'s code (EMV),
early stopping against Alg. 2."""
import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.color import rgb2gray
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from recon.early_stopping import EarlyStopper, ExponentialMovingVariance, MovingVariance, make_variance
from recon.metrics import psnr, ssim

torch.set_num_threads(1)


def _images():
    """64 px grayscale crops of scikit-image test images, each with a noisy and a smoothed copy."""
    rng = np.random.default_rng(0)
    crops = {
        "camera": data.camera()[100:164, 200:264] / 255.0,
        "astronaut": rgb2gray(data.astronaut())[60:124, 180:244],
        "coins": data.coins()[40:104, 40:104] / 255.0,
    }
    out = []
    for name, ref in crops.items():
        noisy = ref + 0.1 * rng.standard_normal(ref.shape)
        smooth = 0.5 * (ref + np.roll(ref, 1, axis=0)) + 0.02 * rng.standard_normal(ref.shape)
        out += [(f"{name}-noisy", ref, noisy), (f"{name}-smooth", ref, smooth)]
    return out


IMAGES = _images()
t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731


@pytest.mark.parametrize("name,ref,test", IMAGES, ids=[i[0] for i in IMAGES])
@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_skimage(name, ref, test, data_range):
    expect = structural_similarity(ref, test, data_range=data_range)
    got = ssim(t(test)[None, None], t(ref)[None, None], data_range=data_range).item()
    assert abs(got - expect) < 1e-3, (name, got, expect)
    # float32 inputs (what the networks produce) agree too
    got32 = ssim(t(test).float(), t(ref).float(), data_range=data_range).item()
    assert abs(got32 - expect) < 1e-3


@pytest.mark.parametrize("name,ref,test", IMAGES, ids=[i[0] for i in IMAGES])
def test_psnr_matches_skimage(name, ref, test):
    for data_range in (1.0, 255.0):
        expect = peak_signal_noise_ratio(ref, test, data_range=data_range)
        got = psnr(t(test)[None, None], t(ref)[None, None], data_range=data_range).item()
        assert got == pytest.approx(expect, abs=1e-6)


def test_ssim_color_matches_skimage_channel_axis():
    rng = np.random.default_rng(1)
    ref = data.astronaut()[100:164, 100:164] / 255.0
    test = np.clip(ref + 0.08 * rng.standard_normal(ref.shape), 0, 1)
    expect = structural_similarity(ref, test, data_range=1.0, channel_axis=-1)
    got = ssim(t(test).permute(2, 0, 1)[None], t(ref).permute(2, 0, 1)[None], data_range=1.0).item()
    assert abs(got - expect) < 1e-3


def test_complex_inputs_use_magnitude():
    rng = np.random.default_rng(2)
    ref_mag = data.camera()[::8, ::8][:64, :64] / 255.0
    phase = rng.uniform(-math.pi, math.pi, ref_mag.shape)
    ref = ref_mag * np.exp(1j * phase)
    test = ref + 0.05 * (rng.standard_normal(ref.shape) + 1j * rng.standard_normal(ref.shape))
    expect_s = structural_similarity(np.abs(ref), np.abs(test), data_range=1.0)
    expect_p = peak_signal_noise_ratio(np.abs(ref), np.abs(test), data_range=1.0)
    assert abs(ssim(t(test), t(ref), data_range=1.0).item() - expect_s) < 1e-3
    assert psnr(t(test), t(ref), data_range=1.0).item() == pytest.approx(expect_p, abs=1e-6)


def test_identical_images_have_ssim_one():
    ref = t(IMAGES[0][1])
    assert ssim(ref, ref, data_range=1.0).item() == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- moving variance (eq. 19)
def _var_eq19(xs: list[np.ndarray], k: int, window: int) -> float:
    """VAR over iterates k..k+W-1, literally as eq. 19 of the CT chapter."""
    block = xs[k:k + window]
    mean = sum(block) / window
    return sum(float(np.sum((x - mean) ** 2)) for x in block) / window


@pytest.mark.parametrize("window", [2, 5, 17])
def test_moving_variance_equals_brute_force(window):
    rng = np.random.default_rng(window)
    xs = [rng.standard_normal((1, 2, 8, 8)) * (1 + 0.1 * k) for k in range(60)]
    mv = MovingVariance(window)
    for k, x in enumerate(xs):
        out = mv.update(torch.from_numpy(x).float())
        if k < window - 1:
            assert out is None
        else:
            expect = _var_eq19([a.astype(np.float32).astype(np.float64) for a in xs], k - window + 1, window)
            assert out.item() == pytest.approx(expect, rel=1e-9, abs=1e-12)


def test_moving_variance_small_spread_over_many_steps():
    # a converged DIP: iterates ~1 that move by 1e-4; the running sums must not drift
    rng = np.random.default_rng(3)
    base = rng.uniform(0.2, 1.0, (1, 1, 32, 32))
    xs = [base + 1e-4 * rng.standard_normal(base.shape) for _ in range(3000)]
    mv = MovingVariance(10)
    for x in xs:
        out = mv.update(torch.from_numpy(x))
    assert out.item() == pytest.approx(_var_eq19(xs, len(xs) - 10, 10), rel=1e-4)


@pytest.mark.parametrize("make", [lambda: MovingVariance(4), lambda: ExponentialMovingVariance(0.2)],
                         ids=["wmv", "emv"])
def test_moving_variance_state_roundtrip(make):
    rng = np.random.default_rng(4)
    xs = [torch.from_numpy(rng.uniform(0, 1, (1, 1, 4, 4))) for _ in range(20)]
    a = make()
    for x in xs[:8]:
        a.update(x)
    b = make()
    b.load_state_dict(a.state_dict())
    for x in xs[8:]:
        assert a.update(x).item() == b.update(x).item()


def test_moving_variance_rejects_small_window():
    with pytest.raises(ValueError, match="window"):
        MovingVariance(1)


def _emv_wang(xs: list[np.ndarray], alpha: float) -> list[float]:
    """Wang et al.'s EWMVar.update_av (ES_EMV.ipynb), transcribed, without the clip (inputs in [0, 1])."""
    ema, emv, out = xs[0], 0.0, [0.0]
    for x in xs[1:]:
        delta = x - ema
        ema = ema + alpha * delta
        emv = (1 - alpha) * (emv + alpha * float(np.sum(delta ** 2)))
        out.append(emv)
    return out


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5])
def test_exponential_moving_variance_equals_wang_et_al(alpha):
    rng = np.random.default_rng(7)
    xs = [rng.uniform(0, 1, (1, 1, 8, 8)) * (1 - 0.005 * k) for k in range(80)]
    ev = ExponentialMovingVariance(alpha)
    expect = _emv_wang(xs, alpha)
    warmup = math.ceil(1 / alpha)
    for k, x in enumerate(xs):
        out = ev.update(torch.from_numpy(x))
        if k < warmup:
            assert out is None  # biased low (v_0 = 0) until ~1/alpha iterates have entered it
        else:
            assert out.item() == pytest.approx(expect[k], rel=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1])
def test_exponential_moving_variance_rejects_alpha_outside_0_1(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ExponentialMovingVariance(alpha)


def test_make_variance_names_the_field_of_an_unknown_kind():
    assert isinstance(make_variance("emv", 10, 0.1), ExponentialMovingVariance)
    assert make_variance("wmv", 10, 0.1).window == 10
    with pytest.raises(ValueError, match="es_variance .*wmv, emv.*'ewm'"):
        make_variance("ewm", 10, 0.1)


# ---------------------------------------------------------------- early stopping (Alg. 2)
def _alg2(g: list[float], patience: int, delta: float) -> tuple[int, int]:
    """Alg. 2 of the CT chapter, literally; returns (k_min, last iteration evaluated)."""
    g_min, k, k_min, last = math.inf, 0, math.inf, -1
    while k <= k_min + patience and k < len(g):
        last = k
        if g[k] < delta * g_min:
            g_min, k_min = g[k], k
        k += 1
    return k_min, last


def _run_stopper(g: list[float], patience: int, delta: float) -> tuple[int, int]:
    es = EarlyStopper(patience, delta)
    for k, value in enumerate(g):
        es.update(k, value)
        if es.should_stop(k):
            return es.best_step, k
    return es.best_step, len(g) - 1


U_SHAPE = [(k - 30) ** 2 / 100 + 1 + 0.3 * math.sin(k) for k in range(120)]  # valley near k = 30


@pytest.mark.parametrize("patience,delta", [(10, 1.0), (25, 1.0), (0, 1.0), (10, 0.99), (40, 0.9)])
def test_early_stopper_follows_alg2(patience, delta):
    best, last = _run_stopper(U_SHAPE, patience, delta)
    assert (best, last) == _alg2(U_SHAPE, patience, delta)
    assert last == min(best + patience, len(U_SHAPE) - 1)  # stops exactly p steps after the best


def test_early_stopper_finds_the_valley():
    best, last = _run_stopper(U_SHAPE, 20, 1.0)
    assert best == int(np.argmin(U_SHAPE[:last + 1]))
    assert 25 <= best <= 35 and last == best + 20


def test_early_stopper_delta_needs_relative_decrease():
    g = [10.0, 9.95, 9.8, 5.0, 4.99]
    es = EarlyStopper(patience=100, delta=0.99)
    flags = [es.update(k, v) for k, v in enumerate(g)]
    assert flags == [True, False, True, True, False]  # 9.95 and 4.99 are not 1 % below the best
    assert es.best_step == 3


def test_early_stopper_never_stops_without_a_value():
    es = EarlyStopper(patience=0)
    assert not es.should_stop(5)


def _disc(n: int) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - n // 2
    return (yy ** 2 + xx ** 2) <= (n // 2) ** 2


@pytest.mark.parametrize("name,ref,test", IMAGES, ids=[i[0] for i in IMAGES])
def test_masked_metrics_match_a_reference_computation(name, ref, test):
    """Inside a disc: PSNR = numpy over the disc's pixels; SSIM = skimage's full=True map averaged
    over the disc (the CT chapter's MaskedPSNR, data range = max of the reference inside)."""
    disc = _disc(ref.shape[0])
    dr = float(ref[disc].max())
    expect_psnr = 10 * np.log10(dr ** 2 / np.mean((ref[disc] - test[disc]) ** 2))
    assert peak_signal_noise_ratio(ref[disc], test[disc], data_range=dr) == pytest.approx(expect_psnr)
    got = psnr(t(test)[None, None], t(ref)[None, None], dr, mask=t(disc)).item()
    assert got == pytest.approx(expect_psnr, abs=1e-9)
    _, smap = structural_similarity(ref, test, data_range=dr, full=True)
    got_ssim = ssim(t(test)[None, None], t(ref)[None, None], dr, mask=t(disc)).item()
    assert got_ssim == pytest.approx(float(smap[disc].mean()), abs=1e-6)
    # the disc changes the numbers: this image is not scored over the whole frame
    assert got_ssim != pytest.approx(float(smap.mean()), abs=1e-6)
