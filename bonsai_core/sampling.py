"""Noise schedules and samplers, written once over sigmas for both model families.

Both parameterisations are written as ``x = alpha(sigma) * x0 + sigma * noise``:

* **SD-style UNet** (``prediction`` ``"epsilon"`` or ``"v_prediction"``): the variance-exploding
  (k-diffusion) form ``x = x0 + sigma * eps``, so ``alpha = 1``. The UNet was trained on the
  variance-preserving sample ``x / sqrt(sigma^2 + 1)``, so the engine scales the model input by
  :func:`model_input_scale` and converts the model output with :func:`epsilon_to_x0` /
  :func:`v_to_x0`.
* **FLUX.2 [klein]** (``prediction`` ``"flow"``): rectified flow
  ``x = (1 - sigma) * x0 + sigma * noise``, so ``alpha = 1 - sigma``; the transformer predicts the
  velocity ``v = noise - x0`` and ``x0 = x - sigma * v`` (:func:`flow_to_x0`). No input scaling.

The engine hands :func:`sample` a denoiser ``denoise(x, i) -> x0``: the model's prediction of the
clean sample (data prediction) at step ``i``, classifier-free guidance already applied
(:func:`to_x0` converts any of the three raw outputs). What the engine feeds the network at step i:

* SD UNet: sample ``x * model_input_scale(schedule, i)`` (= ``x / sqrt(sigma^2 + 1)``), timestep
  ``schedule.timesteps[i]`` (training-timestep units 0..999, possibly fractional, exactly what
  diffusers passes).
* FLUX.2 klein transformer: sample ``x`` unchanged, timestep ``schedule.timesteps[i] / 1000``
  (= sigma, as ``Flux2KleinPipeline`` passes it; the transformer multiplies by 1000 itself).

:func:`model_timestep` returns exactly that timestep. The starting latent is unit Gaussian noise
times :func:`initial_noise_scale`.

Schedules are not written here: :func:`sd_schedule` and :func:`flow_schedule` build diffusers'
``EulerDiscreteScheduler``, ``DPMSolverMultistepScheduler`` or ``FlowMatchEulerDiscreteScheduler``
from the model's scheduler config and read its sigmas and timesteps. The samplers are ours because
the library's are step objects bound to one scheduler each, and ours are one loop over sigmas for
both families, with the cancel check and the data-prediction callback the engine needs.

References:
    Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative
    Models" (arXiv:2206.00364): Euler in sigma space and the rho = 7 sigma schedule.
    Lu, Zhou, Bao, Chen, Li, Zhu 2022/2023, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models" (arXiv:2211.01095): the multistep second-order data-prediction
    solver (DPM-Solver++(2M)).
    Esser et al. 2024 (SD3, arXiv:2403.03206) for the rectified-flow time shift.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import BonsaiCancelledError, BonsaiRequestError

__all__ = [
    "SAMPLERS",
    "PREDICTIONS",
    "Schedule",
    "sd_schedule",
    "flow_schedule",
    "compute_empirical_mu",
    "sample",
    "model_input_scale",
    "model_timestep",
    "initial_noise_scale",
    "epsilon_to_x0",
    "v_to_x0",
    "flow_to_x0",
    "to_x0",
]

SAMPLERS = ("euler", "dpmpp_2m")
PREDICTIONS = ("epsilon", "v_prediction", "flow")

#: The flow pipelines divide the scheduler's timestep (sigma * 1000) by this before calling the
#: transformer (``Flux2KleinPipeline``: ``timestep=timestep / 1000``).
FLOW_TIMESTEP_DIVISOR = 1000.0


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """The sigmas a sampler walks and what the network is told at each step.

    Attributes:
        sigmas: float32 ``[steps + 1]``, strictly decreasing, last entry exactly ``0.0``. In the
            VE form for ``epsilon``/``v_prediction``, in ``[0, 1]`` for ``flow``.
        timesteps: float32 ``[steps]``, the scheduler timestep of each step, as diffusers'
            ``scheduler.timesteps`` (UNet: 0..num_train_timesteps-1; flow: ``sigma * 1000``).
            Pass the network :func:`model_timestep` rather than this directly.
        prediction: ``"epsilon"``, ``"v_prediction"`` or ``"flow"``; decides ``alpha(sigma)``,
            input scaling and how model output becomes ``x0`` (:func:`to_x0`).
        init_noise_sigma: what unit noise is multiplied by for the first latent; ``None`` means
            the default for the parameterisation (``sigmas[0]`` for VE, ``1.0`` for flow).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    prediction: str
    init_noise_sigma: Optional[float] = None

    def __post_init__(self) -> None:
        # A badly built Schedule is a bug in the caller, not a user error: plain ValueError.
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"Schedule.prediction must be one of {PREDICTIONS}, got {self.prediction!r}"
            )
        s, t = self.sigmas, self.timesteps
        if s.ndim != 1 or t.ndim != 1 or s.numel() != t.numel() + 1 or t.numel() < 1:
            raise ValueError(
                "Schedule needs sigmas [steps+1] and timesteps [steps], "
                f"got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        if float(s[-1]) != 0.0:
            raise ValueError(f"Schedule.sigmas must end at 0.0, got {float(s[-1])}")
        if not bool(torch.all(s[1:] < s[:-1])):
            raise ValueError(f"Schedule.sigmas must be strictly decreasing, got {s.tolist()}")
        if self.prediction == "flow" and float(s[0]) > 1.0:
            raise ValueError(f"flow sigmas must lie in [0, 1], got sigma_max {float(s[0])}")

    @property
    def steps(self) -> int:
        """Number of denoiser calls (``len(timesteps)``)."""
        return int(self.timesteps.numel())


# --------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------


def _cfg_get(cfg: dict, key: str, default):
    """``cfg[key]`` with diffusers' convention that a JSON ``null`` means "use the default"."""
    value = cfg.get(key, None)
    return default if value is None else value


def _whole(value) -> Optional[int]:
    """``value`` as an int if it is a whole number (int, numpy integer...), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_steps(steps) -> int:
    n = _whole(steps)
    if n is None or n < 1:
        raise BonsaiRequestError(f"steps must be a whole number of at least 1, got {steps!r}")
    return n


def _refuse_flags(cfg: dict, flags: tuple[str, ...], what: str) -> None:
    for flag in flags:
        if cfg.get(flag):
            raise BonsaiRequestError(
                f"{what} scheduler config sets {flag}={cfg[flag]!r}, which Bonsai does not "
                "implement; remove it from the scheduler config (Karras sigmas are chosen with "
                "the sampler options)"
            )


# --------------------------------------------------------------------------------------------
# SD noise schedules, from diffusers' own schedulers
# --------------------------------------------------------------------------------------------

#: Which diffusers scheduler lays out the sigmas of each SD schedule kind (see :func:`sd_schedule`).
SD_SCHEDULES = ("euler", "dpm")
_BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
_SPACINGS = ("linspace", "leading", "trailing")
#: What a config that says nothing means: SD's training schedule (diffusers' schedulers default
#: to a plain ``linear`` 0.0001..0.02 instead, which no SD checkpoint uses).
SD_TRAINING_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                            beta_schedule="scaled_linear", prediction_type="epsilon",
                            timestep_spacing="linspace")


def _check_sd_config(cfg: dict) -> str:
    """Refuse what the samplers here do not implement, with our own message; returns the
    prediction type. Everything else is diffusers' to read."""
    prediction = _cfg_get(cfg, "prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise BonsaiRequestError(
            f"prediction_type {prediction!r} is not supported for SD-style models: choose "
            "'epsilon' or 'v_prediction'"
        )
    if cfg.get("rescale_betas_zero_snr") and prediction != "v_prediction":
        # with zero terminal SNR the noisiest input holds nothing of the image, so predicting the
        # noise there tells nothing (Lin et al. 2024 train such models with v-prediction)
        raise BonsaiRequestError(
            "scheduler config sets rescale_betas_zero_snr=True (zero terminal SNR) with prediction_type "
            f"{prediction!r}: at zero SNR a noise prediction is empty; use prediction_type 'v_prediction'"
        )
    _refuse_flags(cfg, ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                        "euler_at_final", "thresholding"), "SD")
    if cfg.get("trained_betas") is None:
        kind = _cfg_get(cfg, "beta_schedule", "scaled_linear")
        if kind not in _BETA_SCHEDULES:
            raise BonsaiRequestError(
                f"unknown beta_schedule {kind!r}: choose one of {', '.join(map(repr, _BETA_SCHEDULES))}"
            )
    spacing = _cfg_get(cfg, "timestep_spacing", "linspace")
    if spacing not in _SPACINGS:
        raise BonsaiRequestError(
            f"unknown timestep_spacing {spacing!r}: choose one of {', '.join(map(repr, _SPACINGS))}"
        )
    interpolation = _cfg_get(cfg, "interpolation_type", "linear")
    if interpolation != "linear":
        raise BonsaiRequestError(
            f"interpolation_type {interpolation!r} is not supported: only 'linear'"
        )
    final = _cfg_get(cfg, "final_sigmas_type", "zero")
    if final != "zero":
        raise BonsaiRequestError(f"final_sigmas_type {final!r} is not supported: only 'zero'")
    if _cfg_get(cfg, "timestep_type", "discrete") == "continuous" and prediction == "v_prediction":
        raise BonsaiRequestError(
            "timestep_type 'continuous' with v_prediction (EDM-style) is not supported"
        )
    n = int(_cfg_get(cfg, "num_train_timesteps", 1000))
    if n < 2:
        raise BonsaiRequestError(f"scheduler config num_train_timesteps must be at least 2, got {n}")
    return prediction


def sd_schedule(steps: int, scheduler_config: dict | None = None, karras: bool = False,
                kind: str = "euler") -> Schedule:
    """The SD (DDPM-trained) noise schedule in VE sigmas, laid out by one of diffusers' schedulers.

    The sigmas and timesteps are the scheduler's own (its ``set_timesteps``), so they agree with
    diffusers exactly; only the solver (:func:`sample`) is ours.

    Args:
        steps: number of denoiser calls, 1..num_train_timesteps.
        scheduler_config: a diffusers ``scheduler_config.json`` dict (any scheduler class; the
            scheduler built here ignores the keys it does not know). What it reads:
            ``num_train_timesteps``, ``beta_start``/``beta_end``/``beta_schedule``/``trained_betas``,
            ``prediction_type`` (``epsilon`` or ``v_prediction``), ``timestep_spacing``,
            ``steps_offset`` (missing keys: :data:`SD_TRAINING_DEFAULTS`, SD1.5's schedule), and
            the scheduler's own keys (``sigma_min``/``sigma_max`` for Euler's
            Karras sigmas, ``lambda_min_clipped`` for DPM's). ``use_karras_sigmas`` in the config
            is ignored: ``karras`` decides.
        karras: Karras et al. 2022 rho=7 sigmas (``use_karras_sigmas=True``).
        kind: ``"euler"``: ``EulerDiscreteScheduler``'s sigmas (fractional timesteps interpolated
            on the training sigmas; k-diffusion's layout, the same for every sampler).
            ``"dpm"``: ``DPMSolverMultistepScheduler``'s (its own spacing over ``steps + 1``
            points, integer timesteps), so that DPM++ 2M equals diffusers' DPM-Solver++ pipeline.
            The DPM scheduler works on the variance-preserving sample starting from unit noise;
            in the VE form used here that is an initial noise scale of ``sqrt(sigma_max^2 + 1)``.

    Returns:
        A :class:`Schedule` with float32 sigmas ``[steps+1]`` ending in 0 and float32 timesteps.

    Raises:
        BonsaiRequestError: bad ``steps`` or ``kind``, or a config asking for something not
        implemented.
    """
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    steps = _check_steps(steps)
    if kind not in SD_SCHEDULES:
        raise BonsaiRequestError(f"unknown schedule {kind!r}: choose one of {', '.join(SD_SCHEDULES)}")
    given = {k: v for k, v in dict(scheduler_config or {}).items() if v is not None}
    cfg = {**SD_TRAINING_DEFAULTS, **given}
    prediction = _check_sd_config(cfg)
    n = int(_cfg_get(cfg, "num_train_timesteps", 1000))
    if steps > n:
        raise BonsaiRequestError(f"steps must be at most num_train_timesteps ({n}), got {steps}")
    cfg.pop("_class_name", None)
    cfg.pop("_diffusers_version", None)
    if kind == "euler":
        sched = EulerDiscreteScheduler.from_config(cfg, use_karras_sigmas=bool(karras))
    else:  # the solver is ours (DPM++ 2M): only the scheduler's sigmas are read
        sched = DPMSolverMultistepScheduler.from_config(
            cfg, use_karras_sigmas=bool(karras), algorithm_type="dpmsolver++", solver_order=2,
            final_sigmas_type="zero")
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.to(torch.float32).cpu()
    timesteps = sched.timesteps.to(torch.float32).cpu()
    if steps > 1 and not bool(torch.all(sigmas[1:] < sigmas[:-1])):
        raise BonsaiRequestError(
            f"{steps} steps give repeated sigmas with this schedule; use fewer steps"
        )
    if kind == "euler":
        init = float(sched.init_noise_sigma)
    else:
        init = float((sigmas[0].double() ** 2 + 1) ** 0.5)
    return Schedule(sigmas=sigmas, timesteps=timesteps, prediction=prediction, init_noise_sigma=init)


# --------------------------------------------------------------------------------------------
# Flow-matching schedule (FLUX.2 klein), from diffusers' FlowMatchEulerDiscreteScheduler
# --------------------------------------------------------------------------------------------


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-dependent time-shift exponent mu: diffusers'
    ``pipeline_flux2_klein.compute_empirical_mu`` (two linear fits in the image sequence length
    ``(H/16) * (W/16)``, for 10 and 200 steps, interpolated in the step count)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as mu

    return float(mu(image_seq_len, num_steps))


def flow_schedule(
    steps: int,
    image_seq_len: int,
    scheduler_config: dict | None = None,
    sigmas: list[float] | None = None,
) -> Schedule:
    """Rectified-flow sigmas for FLUX.2 [klein]: ``FlowMatchEulerDiscreteScheduler`` driven as
    ``Flux2KleinPipeline`` drives it.

    Base sigmas are ``linspace(1, 1/steps, steps)`` (or ``sigmas`` if given: ``steps`` values in
    (0, 1]); with ``use_dynamic_shifting`` the scheduler shifts them with
    ``mu = compute_empirical_mu(image_seq_len, steps)``, otherwise with its static ``shift``.
    ``0`` is appended; ``timesteps = sigma * num_train_timesteps``. The klein transformer is called
    with ``timesteps / 1000`` (i.e. sigma), see :func:`model_timestep`.

    Args:
        steps: number of transformer calls (klein: 4).
        image_seq_len: latent tokens, ``(H / 16) * (W / 16)`` for an H x W image.
        scheduler_config: the model's diffusers scheduler config dict (``shift``,
            ``use_dynamic_shifting``, ``time_shift_type``, ``num_train_timesteps``).
        sigmas: custom base sigmas (before shifting), ``steps`` values in (0, 1].

    Raises:
        BonsaiRequestError: bad ``steps``/``image_seq_len``/``sigmas`` or unsupported config flags.
    """
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = _check_steps(steps)
    seq = _whole(image_seq_len)
    if seq is None or seq < 1:
        raise BonsaiRequestError(
            f"image_seq_len must be a positive whole number of tokens, got {image_seq_len!r}"
        )
    cfg = {k: v for k, v in dict(scheduler_config or {}).items() if v is not None}
    _refuse_flags(
        cfg,
        (
            "shift_terminal",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "stochastic_sampling",
        ),
        "flow",
    )
    if sigmas is None:
        base = np.linspace(1.0, 1.0 / steps, steps)
    else:
        base = np.array([float(s) for s in sigmas], dtype=np.float64)
        if base.size != steps:
            raise BonsaiRequestError(
                f"custom sigmas must have one value per step ({steps}), got {base.size}"
            )
        if not bool(np.all((base > 0) & (base <= 1))):
            raise BonsaiRequestError(f"custom flow sigmas must lie in (0, 1], got {base.tolist()}")
    shift = float(_cfg_get(cfg, "shift", 1.0))
    if shift <= 0:
        raise BonsaiRequestError(f"scheduler config shift must be positive, got {shift}")
    kind = _cfg_get(cfg, "time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise BonsaiRequestError(f"unknown time_shift_type {kind!r}: choose 'exponential' or 'linear'")
    cfg.pop("_class_name", None)
    cfg.pop("_diffusers_version", None)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    mu = compute_empirical_mu(seq, steps) if cfg.get("use_dynamic_shifting") else None
    sched.set_timesteps(sigmas=base, mu=mu)
    out = sched.sigmas.to(torch.float32).cpu()
    timesteps = sched.timesteps.to(torch.float32).cpu()
    if steps > 1 and not bool(torch.all(out[1:] < out[:-1])):
        raise BonsaiRequestError(f"flow sigmas must be strictly decreasing, got {out.tolist()}")
    return Schedule(sigmas=out, timesteps=timesteps, prediction="flow", init_noise_sigma=1.0)


# --------------------------------------------------------------------------------------------
# Conversions the engine uses around the network
# --------------------------------------------------------------------------------------------


def model_input_scale(schedule: Schedule, i: int) -> float:
    """Factor for the network input at step ``i``: ``1/sqrt(sigma^2 + 1)`` (VE -> VP sample the UNet
    was trained on) for epsilon / v-prediction, ``1.0`` for flow."""
    if schedule.prediction == "flow":
        return 1.0
    sigma = float(schedule.sigmas[i])
    return 1.0 / math.sqrt(sigma * sigma + 1.0)


def model_timestep(schedule: Schedule, i: int) -> torch.Tensor:
    """The timestep to give the network at step ``i``, a float32 scalar tensor.

    UNet: ``schedule.timesteps[i]`` (training-timestep units, possibly fractional).
    FLUX.2 klein transformer: ``schedule.timesteps[i] / 1000`` (= sigma; the pipeline's convention,
    the transformer multiplies by 1000 in its time embedding).
    """
    t = schedule.timesteps[i]
    if schedule.prediction == "flow":
        return t / FLOW_TIMESTEP_DIVISOR
    return t


def initial_noise_scale(schedule: Schedule) -> float:
    """What to multiply unit Gaussian noise by to get the first latent ``x_T``.

    Epsilon/v: diffusers' ``init_noise_sigma`` (``sigma_max`` for linspace/trailing spacing,
    ``sqrt(sigma_max^2 + 1)`` for leading). Flow: ``1.0`` (``x_T`` is the noise at sigma 1).
    """
    if schedule.init_noise_sigma is not None:
        return float(schedule.init_noise_sigma)
    if schedule.prediction == "flow":
        return 1.0
    return float(schedule.sigmas[0])


def epsilon_to_x0(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """VE form ``x = x0 + sigma * eps``: ``x0 = x - sigma * eps``."""
    return x - sigma * eps


def v_to_x0(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """v-prediction (Salimans & Ho 2022) for a VE-space ``x``: the network sees
    ``x / sqrt(sigma^2+1)`` and predicts ``v = alpha*eps - s*x0`` of that VP sample, so
    ``x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v`` (as diffusers' Euler)."""
    sigma2 = sigma * sigma + 1
    return x / sigma2 - (sigma / sigma2**0.5) * v


def flow_to_x0(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """Rectified flow ``x = (1 - sigma) x0 + sigma * noise``, ``v = noise - x0``:
    ``x0 = x - sigma * v``."""
    return x - sigma * v


def to_x0(schedule: Schedule, x: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor:
    """Convert the network's raw output at step ``i`` into the data prediction ``x0``."""
    sigma = float(schedule.sigmas[i])
    if schedule.prediction == "epsilon":
        return epsilon_to_x0(x, model_output, sigma)
    if schedule.prediction == "v_prediction":
        return v_to_x0(x, model_output, sigma)
    return flow_to_x0(x, model_output, sigma)


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def _alpha(prediction: str, sigma: float) -> float:
    """Signal coefficient: ``x = alpha(sigma) * x0 + sigma * noise``."""
    return 1.0 - sigma if prediction == "flow" else 1.0


def _lambda(prediction: str, sigma: float) -> float:
    """Half log-SNR ``lambda = log(alpha / sigma)`` (Lu et al.); ``-inf`` at pure noise
    (flow sigma 1)."""
    alpha = _alpha(prediction, sigma)
    if alpha <= 0.0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)


def _euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Karras et al. 2022 (alg. 1 without the Heun correction): ``d = (x - x0)/sigma``,
    ``x_next = x + d * (sigma_next - sigma)``. For flow ``d`` is exactly the velocity, so this is
    flow-matching Euler. The step to sigma 0 returns ``x0`` (the exact limit)."""
    if sigma_next == 0.0:
        return x0.clone()
    d = (x - x0) / sigma
    return x + d * (sigma_next - sigma)


def sample(
    denoise: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    schedule: Schedule,
    sampler: str = "euler",
    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """Run the sampler from ``schedule.sigmas[0]`` down to 0.

    Args:
        denoise: ``denoise(x, i) -> x0``, the data prediction at step ``i`` for the current
            latent ``x`` (same shape; float32, or float64 if ``x`` was: cast it to the model's
            dtype inside). The engine wraps network, input scaling, timestep and CFG.
        x: the starting latent, ``unit_noise * initial_noise_scale(schedule)``; any shape, any float
            dtype. Half-precision inputs are carried in float32 internally.
        schedule: from :func:`sd_schedule` or :func:`flow_schedule`.
        sampler: ``"euler"`` or ``"dpmpp_2m"``.
        callback: ``callback(i, n, x0)`` after every step, ``i`` = 0-based step just finished,
            ``n`` = total steps, ``x0`` = that step's data prediction (a preview). Its exceptions
            propagate untouched.
        cancel: ``cancel()`` is asked before every step; ``True`` raises
            :class:`BonsaiCancelledError` ("cancelled at step i/n", i = steps completed).

    Returns:
        The final sample (sigma 0), same shape and dtype as ``x``.

    ``dpmpp_2m`` is DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep), written for any
    ``alpha(sigma)``. With ``lambda = log(alpha/sigma)``, ``h = lambda_next - lambda``::

        x_next = (sigma_next / sigma) * x - alpha_next * (exp(-h) - 1) * D
        D = x0                                    first step, and the step to sigma 0
        D = (1 + 1/(2r)) x0_i - 1/(2r) x0_(i-1)   otherwise, r = h_prev / h

    For ``alpha = 1`` this is k-diffusion's ``sample_dpmpp_2m``; for flow it is diffusers'
    ``DPMSolverMultistepScheduler`` with flow sigmas. At flow sigma 1, lambda is -inf: the first
    step is then exactly ``sigma_next * x + alpha_next * x0`` and the second uses ``r = inf``
    (first order), as in diffusers.
    """
    if sampler not in SAMPLERS:
        raise BonsaiRequestError(
            f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}"
        )
    if not torch.is_floating_point(x):
        raise ValueError(f"sample() needs a floating-point latent, got {x.dtype}")

    out_dtype = x.dtype
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(state_dtype)
    sigmas = [float(s) for s in schedule.sigmas.tolist()]  # float32 values, float64 arithmetic
    n = schedule.steps
    prediction = schedule.prediction

    old_x0: Optional[torch.Tensor] = None
    h_prev: Optional[float] = None
    for i in range(n):
        if cancel is not None and cancel():
            raise BonsaiCancelledError(f"cancelled at step {i}/{n}")
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, i).to(state_dtype)

        if sampler == "euler":
            x = _euler_step(x, x0, sigma, sigma_next)
        else:  # dpmpp_2m
            if sigma_next == 0.0:
                # lambda_next = +inf: sigma_next/sigma = 0, exp(-h) = 0, alpha_next = 1 -> x0.
                x = x0.clone()
            else:
                lam, lam_next = _lambda(prediction, sigma), _lambda(prediction, sigma_next)
                h = lam_next - lam
                if old_x0 is None or h_prev is None:
                    d = x0
                else:
                    r = h_prev / h
                    c = 1.0 / (2.0 * r)  # 0 when h_prev is inf (first flow step from sigma 1)
                    d = (1.0 + c) * x0 - c * old_x0
                x = (sigma_next / sigma) * x - (_alpha(prediction, sigma_next) * math.expm1(-h)) * d
                h_prev = h
            old_x0 = x0

        if callback is not None:
            callback(i, n, x0)
    return x.to(out_dtype)
