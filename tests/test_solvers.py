"""Solvers: registry, parameter errors, loss wiring, determinism, resume, warm start, ES, EMA.

Every run here is tiny (32 px, 2-scale 8-channel networks, a dozen steps) so the file stays fast
on a shared 2-core machine; quality is checked in test_solvers_quality.py.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from skimage import data, restoration, transform

from recon.tasks import simulate
from recon.solvers import get_solver, run_solver, solver_names
from recon.solvers.base import make_params
from recon.solvers.common import divergence, gradient, tv_norm
from recon.solvers.loop import Loop, LoopSettings
from recon.solvers.pnp_admm import conjugate_gradient

torch.set_num_threads(1)

NETWORK_SOLVERS = ["dip", "es-dip", "tv-dip", "tv-dip-hqs", "self-guided", "aseqdip", "dip-red",
                   "dip-denoiser-hqs", "dip-denoiser-admm", "dip-admm", "deep-decoder"]
CLASSICAL = ["adjoint", "fbp", "tv", "pnp-admm"]
BLOCK = {"tv-dip-hqs", "dip-red", "dip-denoiser-hqs", "dip-denoiser-admm", "aseqdip"}


def small_params(name: str, **extra) -> dict:
    """Tiny networks, short blocks (so a dozen steps cross several outer updates)."""
    p: dict = {}
    if name in NETWORK_SOLVERS:
        p["network"] = "deep-decoder-small" if name == "deep-decoder" else "tiny"
    if name in BLOCK:
        p["inner_steps"] = 3
    if name == "self-guided":
        p["n_eta"] = 2
    return {**p, **extra}


@pytest.fixture(scope="module")
def image32():
    return transform.resize(data.camera() / 255.0, (32, 32), anti_aliasing=True)


@pytest.fixture(scope="module")
def denoise(image32):
    return simulate("denoise", image32, {"sigma": 25}, seed=0)


@pytest.fixture(scope="module")
def ct(image32):
    return simulate("ct", image32, {"views": 8}, seed=0)


def run(name, problem, steps=9, seed=0, **kw):
    params = kw.pop("params", None)
    return run_solver(name, problem, steps=steps, params=small_params(name, **(params or {})),
                      seed=seed, device="cpu", ssim_every=kw.pop("ssim_every", 4), **kw)


def problem_for(name, denoise, ct):
    return ct if name == "fbp" else denoise


# ------------------------------------------------------------------ registry and parameter errors
def test_registry_lists_every_solver():
    expected = set(NETWORK_SOLVERS + CLASSICAL)
    assert set(solver_names()) == expected
    for name in expected:
        cls = get_solver(name)
        assert cls.name == name and "data" in cls.terms
        assert cls.uses_network == (name in NETWORK_SOLVERS)


def test_unknown_solver_names_the_choices(denoise):
    with pytest.raises(ValueError, match=r"unknown solver 'nope'.*aseqdip.*tv-dip"):
        run_solver("nope", denoise, steps=1)


@pytest.mark.parametrize("name, params, message", [
    ("dip", {"lrr": 0.1}, r"solver 'dip' params: unknown field\(s\) lrr"),
    ("dip", {"lr": "fast"}, r"params\.lr: expected a number"),
    ("aseqdip", {"N": 1.5}, r"params\.inner_steps: expected an integer"),
    ("tv-dip-hqs", {"inner_steps": 0}, r"option inner_steps \(N, N_sub\): got 0, expected an integer >= 1"),
    ("dip-red", {"L": 1.0}, r"option L: got 1\.0, expected a number > 1"),
    ("dip-denoiser-admm", {"denoiser": "wiener"}, r"option denoiser: got 'wiener', expected one of 'tv', 'nlm', 'bm3d'"),
    ("self-guided", {"gamma": 1.0}, r"option gamma \(alpha\): got 1\.0, expected a number in \[0, 1\)"),
    ("deep-decoder", {"network": "skip"}, r"option network: got 'skip', expected one of 'deep-decoder'.*Deep Decoder preset"),
    ("dip", {"network": "resnet"}, r"option network: got 'resnet', expected one of 'skip', 'unet'"),
    ("tv", {"alpha": -1}, r"solver 'tv' option alpha: got -1\.0, expected a number >= 0"),
    ("pnp-admm", {"rho": 0}, r"solver 'pnp-admm' option rho: got 0\.0, expected a number > 0"),
])
def test_bad_params_give_clear_errors(denoise, name, params, message):
    with pytest.raises(ValueError, match=message):
        run_solver(name, denoise, steps=1, params=params, device="cpu")


def test_fbp_needs_ct(denoise):
    with pytest.raises(ValueError, match="fbp: filtered back-projection exists for CT only"):
        run_solver("fbp", denoise, steps=1, device="cpu")


def test_tv_needs_a_linear_operator(image32):
    nonlinear = simulate("deblur", image32, {"nonlinear": True}, seed=0)
    with pytest.raises(ValueError, match="tv: needs a linear operator"):
        run_solver("tv", nonlinear, steps=1, device="cpu")


# methods that define their own architecture and input (Heckel & Hand; DIP-ADMM thesis Sec. 3.3)
OWN_ARCHITECTURE = {"deep-decoder", "dip-admm"}


@pytest.mark.parametrize("task", ["denoise", "mri"])
def test_network_solvers_share_one_default_network_and_input_channels(image32, task):
    """Fair comparison (CT chapter Sec. 6): one network, input channel count and Adam lr by default."""
    problem = simulate(task, image32, {"sigma": 25} if task == "denoise" else {}, seed=0)
    shared = sorted(set(NETWORK_SOLVERS) - OWN_ARCHITECTURE)
    seen = set()
    for name in shared:
        cls = get_solver(name)
        params = make_params(cls.Params, {})
        solver = cls(problem, params, seed=0, device=torch.device("cpu"))
        first_conv = next(m for m in solver.net.modules() if isinstance(m, torch.nn.Conv2d))
        seen.add((params.network, params.lr, solver.z.shape[1], first_conv.in_channels))
    assert seen == {("unet", 1e-4, problem.channels, problem.channels)}, seen
    admm = make_params(get_solver("dip-admm").Params, {})
    assert (admm.network, admm.input_distribution, admm.input_noise_scale) == ("dip-admm", "gaussian", 1.0)


def test_noise_input_is_gaussian_with_the_images_channels(denoise):
    """Vanilla DIP's z = 0.1 N(0, I) of the image's shape (the CT chapter's code, run_dip.py)."""
    rec = Recorder("dip", denoise, small_params("dip"), steps=1)
    z = rec.solver.z
    assert z.shape == denoise.image_shape
    assert float(z.min()) < 0 and 0.05 < float(z.std()) < 0.15
    uniform = Recorder("dip", denoise, small_params("dip", input_distribution="uniform", input_channels=32),
                       steps=1).solver.z
    assert uniform.shape[1] == 32 and float(uniform.min()) >= 0 and float(uniform.max()) <= 0.1
    with pytest.raises(ValueError, match="option input_distribution: got 'laplace', expected one of 'gaussian', 'uniform'"):
        run("dip", denoise, steps=1, params={"input_distribution": "laplace"})


def test_aliases_map_to_fields():
    p = make_params(get_solver("aseqdip").Params, {"lambda": 0.5, "N": 4})
    assert (p.lam, p.inner_steps) == (0.5, 4)


# ------------------------------------------------------------------ loss wiring
class Recorder:
    """Run a solver through the shared loop, keeping the solver (for its weights) and iterates."""

    def __init__(self, name, problem, params, steps, seed=0):
        cls = get_solver(name)
        self.solver = cls(problem, make_params(cls.Params, params), seed=seed, device=torch.device("cpu"))
        self.images = []
        step = self.solver.step

        def recording(k):
            out = step(k)
            self.images.append(out.image.clone())
            return out

        self.solver.step = recording
        self.result = Loop(self.solver, LoopSettings(steps=steps, ssim_every=0)).run()


def weight_of(name, solver, k):
    """The weight each solver puts on its regulariser at step k (from its params)."""
    p = solver.params
    return {
        "tv-dip": lambda: p.alpha, "tv": lambda: p.alpha, "aseqdip": lambda: p.lam,
        "self-guided": lambda: p.lam, "dip-admm": lambda: p.rho, "pnp-admm": lambda: p.rho,
        "dip-red": lambda: p.lam * p.L, "dip-denoiser-admm": lambda: p.beta,
        "tv-dip-hqs": lambda: p.lam / solver.alpha(k // p.inner_steps),
        "dip-denoiser-hqs": lambda: p.lam / solver.alpha(k // p.inner_steps),
    }[name]()


REGULARISED = ["tv-dip", "tv-dip-hqs", "self-guided", "aseqdip", "dip-red", "dip-denoiser-hqs",
               "dip-denoiser-admm", "dip-admm", "tv", "pnp-admm"]
# (weight field, a value, another value): the regulariser off (0) where the method allows it
WEIGHTS = {"tv-dip": ("alpha", 0.0, 0.05), "tv-dip-hqs": ("lam", 0.0, 0.05), "self-guided": ("lam", 0.0, 1.0),
           "aseqdip": ("lam", 0.0, 1.0), "dip-red": ("lam", 0.0, 0.5), "dip-denoiser-hqs": ("lam", 0.0, 1e-3),
           "dip-denoiser-admm": ("beta", 0.0, 1.0), "dip-admm": ("rho", 0.2, 5.0), "tv": ("alpha", 0.0, 0.05),
           "pnp-admm": ("rho", 0.2, 5.0)}


@pytest.mark.parametrize("name", REGULARISED)
def test_loss_is_data_plus_weighted_regulariser(denoise, name):
    rec = Recorder(name, denoise, small_params(name), steps=7)
    h = rec.result.history
    (term,) = [t for t in get_solver(name).terms if t != "data"]
    weights = np.array([weight_of(name, rec.solver, k) for k in range(7)])
    assert np.all(h[term] > 0), f"{name}: its {term} term is zero, the check below would prove nothing"
    np.testing.assert_allclose(h["loss"], h["data"] + weights * h[term], rtol=1e-5)


@pytest.mark.parametrize("name", REGULARISED)
def test_regulariser_weight_changes_the_iterates(denoise, name):
    field, a, b = WEIGHTS[name]
    ra = run(name, denoise, steps=4, params={field: a}, seed=3)
    rb = run(name, denoise, steps=4, params={field: b}, seed=3)
    # same seed and data: any difference comes from the regulariser's gradient / update
    assert not torch.equal(ra.image, rb.image), f"{name}: {field}={a} and {field}={b} give the same image"
    assert not np.array_equal(ra.history["data"][1:], rb.history["data"][1:])


def test_aseqdip_autoencoding_term_reaches_the_gradient(denoise):
    """The public aSeqDIP notebook computes the autoencoding term but drops it from the loss."""
    ra = run("aseqdip", denoise, steps=2, params={"lam": 0.0})
    rb = run("aseqdip", denoise, steps=2, params={"lam": 1.0})
    assert ra.history["autoencoding"][0] == rb.history["autoencoding"][0]  # same start
    assert not torch.equal(ra.image, rb.image)


def test_tv_matches_a_numpy_reference():
    x = torch.rand(1, 2, 9, 7, dtype=torch.float64)
    a = x.numpy()[0]
    dy = np.diff(a, axis=1, append=a[:, -1:, :])
    dx = np.diff(a, axis=2, append=a[:, :, -1:])
    assert float(tv_norm(x)) == pytest.approx(np.sqrt(dy ** 2 + dx ** 2).sum(), rel=1e-12)
    # the smoothed TV stays within eps per pixel and channel of the exact one
    eps = 1e-3
    assert 0 <= float(tv_norm(x) - tv_norm(x, eps)) <= eps * x.numel()
    p = torch.randn(1, 2, 2, 9, 7, dtype=torch.float64)
    assert float(torch.sum(gradient(x) * p)) == pytest.approx(-float(torch.sum(x * divergence(p))), rel=1e-12)


def test_classical_tv_matches_scikit_image_on_denoising(denoise):
    """PDHG on 1/2||x - y||^2 + w TV(x) against skimage's Chambolle solver of the same problem."""
    w = 0.1
    res = run_solver("tv", denoise, steps=300, params={"alpha": w}, device="cpu", ssim_every=0)
    ref = restoration.denoise_tv_chambolle(denoise.measurements[0, 0].double().numpy(), weight=w,
                                           eps=1e-8, max_num_iter=2000)
    assert np.abs(res.image[0, 0].numpy() - ref).max() < 5e-3
    assert res.history["loss"][-1] < res.history["loss"][0]


def test_pnp_admm_with_the_tv_prox_solves_the_tv_problem(ct):
    """ADMM with prox_{alpha TV / rho} and PDHG minimise the same 1/2||Ax - y||^2 + alpha TV(x)."""
    w = 0.05
    objective = lambda x: float(ct.data_fidelity(x) + w * tv_norm(x))  # noqa: E731
    pdhg = run_solver("tv", ct, steps=1000, params={"alpha": w}, device="cpu", ssim_every=0)
    admm = run_solver("pnp-admm", ct, steps=200, params={"denoiser": "tv", "strength": w}, device="cpu",
                      ssim_every=0)
    assert objective(admm.image) == pytest.approx(objective(pdhg.image), rel=1e-4)
    assert objective(pdhg.image) < objective(ct.fbp_image())
    assert float((admm.image - pdhg.image).abs().max()) < 1e-2


def test_conjugate_gradient_solves_a_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = m @ m.T + 12 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, torch.zeros(12, dtype=torch.float64), 50, 1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def test_pnp_admm_y_step_is_exact_for_denoising(denoise):
    rec = Recorder("pnp-admm", denoise, {"rho": 2.0}, steps=1)
    s, y = rec.solver, denoise.measurements
    # y_1 = (y + rho (x_1 + u_0)) / (1 + rho) with u_0 = 0, and u_1 = x_1 - y_1
    x1 = rec.images[0]
    torch.testing.assert_close(s.y, (y + 2.0 * x1) / 3.0)
    torch.testing.assert_close(s.u, x1 - s.y)


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("name", sorted(NETWORK_SOLVERS + CLASSICAL))
def test_same_seed_same_numbers(denoise, ct, name):
    problem = problem_for(name, denoise, ct)
    a, b = run(name, problem, seed=5), run(name, problem, seed=5)
    assert a.history.keys() == b.history.keys()
    for key in a.history:
        np.testing.assert_array_equal(a.history[key], b.history[key], err_msg=f"{name}: {key}")
    assert torch.equal(a.image, b.image)
    if name in NETWORK_SOLVERS:
        c = run(name, problem, seed=6)
        assert not torch.equal(a.image, c.image), f"{name}: seeds 5 and 6 give the same image"


# ------------------------------------------------------------------ checkpoint / resume
class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", ["dip", "es-dip", "aseqdip", "self-guided", "dip-denoiser-admm",
                                  "tv-dip-hqs", "dip-red", "dip-admm", "tv", "pnp-admm"])
def test_resume_gives_identical_numbers(denoise, tmp_path, name):
    steps, extra = 12, {"variance_window": 3, "ema_decay": 0.5}  # exercise moving variance and EMA state
    straight = run(name, denoise, steps=steps, params=extra)

    def interrupt(done, total, values):
        if done == 11:  # progress runs at steps 0 and 10; the last checkpoint is at step 8
            raise Interrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        run(name, denoise, steps=steps, params=extra, checkpoint_path=ckpt, checkpoint_every=4, progress=interrupt)
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=True)
    assert state["next_step"] == 8  # resumes inside a block (8 % 3 != 0) for the block solvers
    resumed = run(name, denoise, steps=steps, params=extra, checkpoint_path=ckpt, checkpoint_every=4)
    assert resumed.steps_run == steps
    for key in straight.history:
        np.testing.assert_array_equal(resumed.history[key], straight.history[key], err_msg=f"{name}: {key}")
    assert torch.equal(resumed.image, straight.image)
    assert torch.equal(resumed.ema_image, straight.ema_image)
    assert resumed.peak_step == straight.peak_step and resumed.es_step == straight.es_step


# ------------------------------------------------------------------ warm start
@pytest.mark.parametrize("name", ["dip", "self-guided", "aseqdip"])
def test_warm_start_from_saved_weights(denoise, tmp_path, name):
    path = tmp_path / "weights.pt"
    first = run(name, denoise, steps=6, save_weights=path)
    saved = torch.load(path, weights_only=True)
    cls = get_solver(name)
    warm = cls(denoise, make_params(cls.Params, small_params(name, init_weights=str(path))), seed=1,
               device=torch.device("cpu"))
    for key, value in warm.net.state_dict().items():
        assert torch.equal(value, saved[key]), key
    cold = run(name, denoise, steps=1)
    hot = run(name, denoise, steps=1, params={"init_weights": str(path)})
    assert hot.history["loss"][0] != cold.history["loss"][0]
    if name == "dip":  # same seed, same z: the warm run starts where the first one ended
        assert hot.history["psnr"][0] == pytest.approx(first.final_psnr, abs=1e-6)


def test_warm_start_with_a_wrong_file_is_a_clear_error(denoise, tmp_path):
    other = tmp_path / "other.pt"
    run("dip", denoise, steps=1, save_weights=other)  # weights of the tiny network
    with pytest.raises(ValueError, match=r"init_weights .*other\.pt: does not fit network 'skip-small'"):
        run("dip", denoise, steps=1, params={"network": "skip-small", "init_weights": str(other)})
    with pytest.raises(FileNotFoundError, match=r"init_weights: no such file .*missing\.pt"):
        run("dip", denoise, steps=1, params={"init_weights": str(tmp_path / "missing.pt")})
    junk = tmp_path / "junk.pt"
    junk.write_text("not a state dict")
    with pytest.raises(ValueError, match=r"init_weights .*junk\.pt"):
        run("dip", denoise, steps=1, params={"init_weights": str(junk)})


# ------------------------------------------------------------------ early stopping, jitter, EMA
@pytest.mark.parametrize("variance", [{"variance_window": 5}, {"es_variance": "emv", "emv_alpha": 0.2}],
                         ids=["wmv", "emv"])
def test_es_dip_stops_and_returns_the_selected_iterate(denoise, variance):
    patience, budget = 15, 400
    params = {**variance, "patience": patience}
    res = run("es-dip", denoise, steps=budget, params=params, ssim_every=0)
    assert res.stopped_early and res.steps_run < budget
    assert patience <= res.steps_run - 1 - res.es_step <= patience + 1
    assert torch.equal(res.image, res.es_image)
    # the selected iterate is f(z) after es_step updates: a plain DIP run of es_step steps ends there
    dip = run("dip", denoise, steps=res.es_step, ssim_every=0)
    torch.testing.assert_close(res.image, dip.image, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(res.history["loss"][: res.es_step], dip.history["loss"])
    # its moving variance is the smallest of the run (delta = 1)
    assert res.history["movvar"][res.es_step] == np.nanmin(res.history["movvar"])


def test_es_dip_returns_the_selected_iterate_when_the_budget_ends_first(denoise):
    rec = Recorder("es-dip", denoise, small_params("es-dip", variance_window=4), steps=20)
    res = rec.result
    assert not res.stopped_early and res.steps_run == 20 and 3 <= res.es_step < 20
    assert torch.equal(res.image, rec.images[res.es_step])


def test_dip_jitter_perturbs_the_input_reproducibly(denoise):
    plain = run("dip", denoise, steps=5)
    a = run("dip", denoise, steps=5, params={"jitter": 1 / 30})  # Ulyanov et al.'s 1/30
    b = run("dip", denoise, steps=5, params={"jitter": 1 / 30})
    assert torch.equal(a.image, b.image)
    assert plain.history["loss"][0] != a.history["loss"][0]  # the first output already differs
    assert not torch.equal(plain.image, a.image)


def test_dip_output_ema_is_returned_and_scored(denoise):
    decay = 0.9
    rec = Recorder("dip", denoise, small_params("dip", ema_decay=decay), steps=6)
    res = rec.result
    ema, scores = rec.images[0], []
    for x in rec.images[1:]:
        ema = decay * ema + (1 - decay) * x
    torch.testing.assert_close(res.ema_image, ema)
    assert torch.equal(res.image, res.ema_image)  # the method's result is the EMA, not the last iterate
    # the EMA is scored every step through the task's score, and its final score is the summary's
    ema = rec.images[0]
    for k, x in enumerate(rec.images):
        ema = ema if k == 0 else decay * ema + (1 - decay) * x
        scores.append(float(denoise.score(ema, with_ssim=False)["psnr"]))
    np.testing.assert_allclose(res.history["ema_psnr"], scores, rtol=1e-6)
    assert res.final_psnr == pytest.approx(float(denoise.score(res.ema_image)["psnr"]), abs=1e-5)
    assert res.ema_psnr == res.final_psnr and res.summary()["ema_psnr"] == res.ema_psnr
    assert res.history["ema_psnr"][-1] != res.history["psnr"][-1]
    assert np.isfinite(res.summary()["ema_ssim"])
    off = Recorder("dip", denoise, small_params("dip"), steps=2).result
    assert off.ema_image is None and "ema_psnr" not in off.history and np.isnan(off.summary()["ema_psnr"])


def test_ema_samples_ssim_every_ssim_every_steps(denoise):
    res = run("dip", denoise, steps=9, params={"ema_decay": 0.5}, ssim_every=4)
    assert np.isfinite(res.history["ema_psnr"]).all()
    assert np.flatnonzero(np.isfinite(res.history["ema_ssim"])).tolist() == [0, 4, 8]


def test_dip_admm_ema_changes_its_result(denoise):
    """The thesis' r = 0.9 r + 0.1 x (Sec. 4.2) is what dip-admm returns; 0 returns G(theta)."""
    smooth = run("dip-admm", denoise, steps=12)
    plain = run("dip-admm", denoise, steps=12, params={"ema_decay": 0.0})
    np.testing.assert_array_equal(smooth.history["psnr"], plain.history["psnr"])  # same iterates
    assert not torch.equal(smooth.image, plain.image)
    assert smooth.final_psnr != plain.final_psnr
    assert plain.ema_image is None and np.isnan(plain.ema_psnr)
    assert smooth.final_psnr == pytest.approx(smooth.history["ema_psnr"][-1], abs=1e-4)


def test_self_guided_returns_its_average_and_learns_z(denoise):
    rec = Recorder("self-guided", denoise, small_params("self-guided", gamma=0.5), steps=4)
    s = rec.solver
    assert isinstance(s.z, torch.nn.Parameter) and s.z is s.optimizer.param_groups[1]["params"][0]
    assert not torch.equal(s.z.detach(), denoise.measurements)  # z moved from its start y
    # x^(0) = 0 and gamma = 0.5: the first reported iterate is half the first mean output, whose
    # scale is that of the image; the result is the last iterate x^(N_max)
    assert float(rec.images[0].max()) <= 0.5 + 1e-6
    assert torch.equal(rec.result.image, rec.images[-1])


def test_deep_decoder_uses_its_own_small_input(denoise):
    rec = Recorder("deep-decoder", denoise, small_params("deep-decoder"), steps=2)
    assert rec.solver.z.shape == (1, 32, 4, 4)  # 4 layers: 32 px / 2^3
    assert rec.result.image.shape == denoise.ground_truth.shape
