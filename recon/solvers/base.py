"""Solver contract: a params dataclass, one `step` per optimiser update, resumable state.

The shared loop (`recon.solvers.loop`) owns stepping, metrics, moving variance, early
stopping, EMA and checkpoints; a solver owns its loss and its extra updates.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from recon.early_stopping import VARIANCES
from recon.problem import IMAGE_INPUTS, Problem


@dataclass
class StepOutput:
    """What one step produced: the current iterate (detached) and its loss terms (0-d tensors).

    `terms` must contain 'loss' (the total that was minimised) and each of its terms, e.g.
    'data' and 'reg' / 'autoencoding' / 'tv', so a test can check the regulariser is in the loss.
    """

    image: torch.Tensor
    terms: dict[str, torch.Tensor]


class OptionChecks:
    """Range and choice checks of one solver's options, on values already coerced to their types.

    Each failure is a ValueError naming the solver, the option (with its aliases), the value given
    and what is allowed: "solver 'es-dip' option es_variance: got 'bogus', expected one of 'wmv', 'emv'".
    """

    def __init__(self, solver: str, params: Any):
        self.solver, self.params = solver, params

    def fail(self, option: str, expected: str) -> typing.NoReturn:
        aliases = [a for a, f in getattr(type(self.params), "ALIASES", {}).items() if f == option]
        name = f"{option} ({', '.join(aliases)})" if aliases else option
        raise ValueError(f"solver {self.solver!r} option {name}: got {getattr(self.params, option)!r}, "
                         f"expected {expected}")

    def one_of(self, option: str, choices: tuple[str, ...], note: str = "") -> None:
        if getattr(self.params, option) not in choices:
            self.fail(option, "one of " + ", ".join(map(repr, choices)) + note)

    def at_least(self, low: float, *options: str, strict: bool = False, optional: bool = False) -> None:
        """value >= low (> low when strict); None passes when `optional` (a default chosen later)."""
        for option in options:
            value = getattr(self.params, option)
            if optional and value is None:
                continue
            if not (_is_number(value) and (value > low if strict else value >= low)):
                kind = "an integer" if typing.get_type_hints(type(self.params)).get(option) is int else "a number"
                self.fail(option, f"{kind} {'>' if strict else '>='} {low:g}" + (" (or null)" if optional else ""))

    def positive(self, *options: str, optional: bool = False) -> None:
        self.at_least(0, *options, strict=True, optional=optional)

    def nonnegative(self, *options: str) -> None:
        self.at_least(0, *options)

    def between(self, option: str, low: float, high: float, closed: str = "[)") -> None:
        """low <= value < high, with `closed` saying which ends belong: '[)', '(]', '[]' or '()'."""
        value = getattr(self.params, option)
        above = _is_number(value) and (value >= low if closed[0] == "[" else value > low)
        below = _is_number(value) and (value <= high if closed[1] == "]" else value < high)
        if not (above and below):
            self.fail(option, f"a number in {closed[0]}{low:g}, {high:g}{closed[1]}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SolverParams:
    """Options the shared loop reads from every solver's params.

    Defaults: window 100 and patience 1000 are ES-WMV's (Wang et al. 2021, Alg. 2 of the CT
    chapter); es_variance 'emv' uses Wang et al.'s ES-EMV instead, with their alpha 0.1
    (ES_EMV.ipynb); ES is off except in `es-dip`; EMA off unless a method uses it.
    """

    ema_decay: float = 0.0
    early_stop: bool = False
    es_variance: str = "wmv"
    variance_window: int = 100
    emv_alpha: float = 0.1
    patience: int = 1000
    es_delta: float = 1.0

    def validate(self, solver: str) -> None:
        """Refuse an option value the method cannot run with (ValueError naming the option, the value
        and what is allowed). Cheap (builds nothing): `Solver.__init__` runs it first, and a
        manifest's pre-flight once per configuration (`make_params(..., solver=name)`)."""
        self.check(OptionChecks(solver, self))

    def check(self, c: OptionChecks) -> None:
        """The checks of these options; a subclass extends it (calling super().check(c) first)."""
        c.between("ema_decay", 0, 1)
        c.one_of("es_variance", VARIANCES)
        c.at_least(2, "variance_window")
        c.between("emv_alpha", 0, 1, "()")
        c.nonnegative("patience")
        c.positive("es_delta")


@dataclass
class NetworkParams(SolverParams):
    """Options shared by every network solver; the defaults are the CT chapter's comparison setup.

    Every network solver defaults to one network, input and step size so that methods compare
    fairly (the chapter, Sec. 6: "all methods use the same random seed, yielding identical initial
    network parameters and random inputs"); only methods that define their own architecture
    (Deep Decoder, DIP-ADMM) override them.

    network: preset of `recon.nets`; 'unet' is the chapter's U-Net (Sec. 6.2).
    input: 'noise' (a fixed random input, vanilla DIP), or an image: 'auto' (the task's default,
        `Problem.initial_image('auto')`), 'adjoint' (A^H y), 'fbp' (CT) or 'measurements' (y).
    input_channels: channels of a noise input; 0 = the image's own channel count, as the chapter's
        code draws z with the image's shape (run_dip.py, model_inp='random'; 1 for its CT slices).
    input_distribution / input_noise_scale: z = 0.1 * N(0, I) ('gaussian'): the chapter's code
        (run_dip.py: z = 0.1 * torch.randn(x.shape)), the z ~ N(0, sigma^2 I) of its Sec. 3.1.
        ('uniform' gives U(0, scale), Ulyanov et al.'s U(0, 1/10) with 32 channels.)
    lr: Adam lr 1e-4: the chapter's code for every method (run_dip.py, --lr default; the text gives
        no step size). Adam's step does not depend on the loss's scale, so it carries over to our
        1/2 sum-of-squares data term with a unit-norm operator unchanged. (That code also clips the
        gradient norm to 1; we do not: with its data term divided by ||A||^4 the clip rarely acts.)
    jitter: std of Gaussian input perturbation per step (Ulyanov et al. use 1/30 for some tasks; off here).
    init_weights: warm start from a state_dict file (`torch.load(weights_only=True)`).
    """

    network: str = "unet"
    lr: float = 1e-4
    input: str = "noise"
    input_channels: int = 0
    input_distribution: str = "gaussian"
    input_noise_scale: float = 0.1
    jitter: float = 0.0
    init_weights: str | None = None

    def check(self, c: OptionChecks) -> None:
        from recon.nets import PRESETS

        super().check(c)
        c.one_of("network", tuple(PRESETS))
        c.positive("lr", "input_noise_scale")
        c.one_of("input", NETWORK_INPUTS)
        c.nonnegative("input_channels", "jitter")
        c.one_of("input_distribution", INPUT_DISTRIBUTIONS)


INPUT_DISTRIBUTIONS = ("gaussian", "uniform")
NETWORK_INPUTS = ("noise", *IMAGE_INPUTS)


def noise_input(shape: tuple[int, ...], distribution: str, scale: float, generator: torch.Generator,
                device: torch.device, solver: str) -> torch.Tensor:
    """A fixed random network input: scale * N(0, I) or scale * U(0, 1)."""
    if distribution == "gaussian":
        return scale * torch.randn(shape, generator=generator, device=device)
    if distribution == "uniform":
        return scale * torch.rand(shape, generator=generator, device=device)
    raise ValueError(f"{solver}: input_distribution must be one of {', '.join(INPUT_DISTRIBUTIONS)}, "
                     f"got {distribution!r}")


def make_params(cls: type, values: dict[str, Any] | None, where: str = "params", solver: str | None = None) -> Any:
    """Build a params dataclass from a mapping, with errors naming the field and expected type;
    given `solver` (its name), also check the values as that solver will (`SolverParams.validate`)."""
    aliases = getattr(cls, "ALIASES", {})
    values = {aliases.get(k, k): v for k, v in (values or {}).items()}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        out[name] = _coerce(value, hints[name], f"{where}.{name}")
    params = cls(**out)
    if solver is not None:
        try:
            params.validate(solver)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return params


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


class Solver:
    """Base of every solver. Subclasses set `name`, `Params` and implement `step`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = SolverParams
    uses_network: ClassVar[bool] = False
    # names of the loss terms `step` reports besides 'loss' (the store creates a column for each)
    terms: ClassVar[tuple[str, ...]] = ("data",)
    # default budget when the caller gives none (classical one-shot methods use 1)
    default_steps: ClassVar[int] = 1
    # True: `recon.solvers.run_solver_pack` can step several jobs of this solver as one
    # computation; such a solver is a NetworkSolver whose step is `objective` + one Adam update
    # (+ `refresh_input`), the form the packed loop batches. False: the caller runs it alone.
    packable: ClassVar[bool] = False

    def __init__(self, problem: Problem, params: Any, seed: int, device: torch.device):
        params.validate(self.name)  # before anything is built (the checks a manifest's pre-flight runs)
        self.problem = problem
        self.params = params
        self.seed = seed
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.last_image: torch.Tensor | None = None

    def step(self, k: int) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def final_image(self) -> torch.Tensor:
        """The image the method returns at the end (default: the last iterate)."""
        assert self.last_image is not None, "final_image() before any step"
        return self.last_image

    # --- resumable state: tensors, numbers, dicts and lists only (weights_only checkpoints) ---
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "last_image": self.last_image,
                "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        # a generator's state is a CPU ByteTensor for every device (map_location may have moved it)
        self.generator.set_state(state["generator"].cpu())
        self.last_image = state["last_image"]
        self.load_extra_state(state["extra"])


class NetworkSolver(Solver):
    """A solver that fits a network f_theta(z) with Adam, one update per step."""

    Params: ClassVar[type] = NetworkParams
    uses_network: ClassVar[bool] = True
    default_steps: ClassVar[int] = 4000  # NK = 4000 in the aSeqDIP paper, Sec. 4 and App. C.5

    def __init__(self, problem: Problem, params: NetworkParams, seed: int, device: torch.device):
        super().__init__(problem, params, seed, device)
        from recon.nets import build_network

        self.z = self.initial_input()
        torch.manual_seed(seed)  # network weights are fixed by the seed
        self.net = build_network(params.network, self.z.shape[1], problem.channels).to(device)
        if params.init_weights:
            self.load_weights(params.init_weights)
        self.optimizer = torch.optim.Adam(self.trainable_parameters(), lr=params.lr)

    def initial_input(self) -> torch.Tensor:
        p = self.params
        if p.input == "noise":
            channels = p.input_channels or self.problem.channels
            shape = (1, channels, *self.problem.image_shape[2:])
            return noise_input(shape, p.input_distribution, p.input_noise_scale, self.generator, self.device,
                               self.name)
        return self.image_input()

    def image_input(self) -> torch.Tensor:
        """The image-shaped input `params.input` names; 'auto' is the task's default (Problem)."""
        kind = self.params.input
        if kind == "noise":
            raise ValueError(f"{self.name}: input must be image-shaped ('auto', 'adjoint', 'fbp' or "
                             f"'measurements'), got 'noise'")
        return self.problem.initial_image(kind).to(self.device).float()

    def load_weights(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"init_weights: no such file {path}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as err:  # not a torch.save file, or one holding more than tensors
            raise ValueError(f"init_weights {path}: not a network state_dict saved by torch.save: {err}") from err
        if not isinstance(state, dict):
            raise ValueError(f"init_weights {path}: expected a state_dict (a mapping of tensors), "
                             f"got {type(state).__name__}")
        try:
            self.net.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"init_weights {path}: does not fit network {self.params.network!r}: {err}") from err

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.net.parameters())

    # ---- the step of a packable solver: objective, one Adam update, maybe a new input ----------
    def objective(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of the network output x ('loss' first: the total minimised)."""
        raise NotImplementedError(f"{self.name}: no objective (it defines its own step)")

    def refresh_input(self, k: int) -> bool:
        """After update k: True when the input becomes f(input) (aSeqDIP's z_k = f(z_{k-1}))."""
        return False

    def iterate(self, x: torch.Tensor) -> torch.Tensor:
        """After the update: the step's iterate from the (detached) network output x."""
        return x

    def step(self, k: int) -> StepOutput:
        x = self.net(self.network_input())
        terms = self.objective(x)
        self.update(terms["loss"])
        if self.refresh_input(k):
            with torch.no_grad():
                self.z = self.net(self.z).detach()
        return StepOutput(self.iterate(x.detach()), {name: t.detach() for name, t in terms.items()})

    def network_input(self) -> torch.Tensor:
        """z, perturbed by Gaussian jitter of std `jitter` when set."""
        if self.params.jitter > 0:
            noise = torch.randn(self.z.shape, generator=self.generator, device=self.device)
            return self.z + self.params.jitter * noise
        return self.z

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def final_image(self) -> torch.Tensor:
        with torch.no_grad():
            return self.net(self.z).detach()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(net=self.net.state_dict(), optimizer=self.optimizer.state_dict(), z=self.z)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            if isinstance(self.z, torch.nn.Parameter):
                self.z.copy_(state["z"])
            else:
                self.z = state["z"].to(self.device)
