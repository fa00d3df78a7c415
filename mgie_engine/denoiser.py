"""The denoiser: InstructPix2Pix steps for many jobs at once, each with its own seed, step and CFG scales.

Guided jobs under Euler-ancestral (the released config) take the fused step: UNet, 3-way CFG and the
scheduler update as one function of tensors (one CUDA graph for any mix of jobs). Other jobs take the
general path: one UNet call for all, then each job's own scheduler step. The parity tests hold both to
``StableDiffusionInstructPix2PixPipeline``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .compilation import STATIC_STEP_OPTIONS, UNET_COMPILE_OPTIONS, mark_sizes_dynamic
from .images import fit_size, snap_size
from .inputs import ImageInput
from .models import MgieModels

if TYPE_CHECKING:
    from .saved_steps import SavedSteps

ROW_BUCKETS = (1, 3, 6, 12, 24, 48, 96, 192)  # UNet batch sizes that get their own CUDA graph
JOB_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # job counts that get their own graph of the fused guided step
_PAD_SCALARS = (500.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)  # a harmless step for the rows that pad a bucket


def guided_euler_ancestral_step(unet: torch.nn.Module, latents: torch.Tensor, image_latents: torch.Tensor,
                                cond: torch.Tensor, scalars: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One InstructPix2Pix step for n guided jobs at once: UNet, 3-way CFG and the Euler-ancestral update.

    The same arithmetic as diffusers' pipeline + ``EulerAncestralDiscreteScheduler.step``, rounded to the
    model dtype where they round, but with every job's timestep, sigmas and CFG scales as tensors, so one
    call (and one CUDA graph) serves any mix of jobs and steps. ``scalars`` holds per job: timestep, input
    scale denominator, sigma, dt, sigma_up, text CFG, image CFG; ``noise`` is the job's ancestral noise
    for this step, drawn ahead from its own generator in the order the scheduler would draw it.
    """
    n, dtype = latents.shape[0], latents.dtype

    def col(k: int) -> torch.Tensor:
        return scalars[:, k].view(n, 1, 1, 1)

    scaled = (latents.float() / col(1)).to(dtype).repeat_interleave(3, dim=0)  # rows: text, image, none
    eps = unet(torch.cat([scaled, image_latents], dim=1), scalars[:, 0].repeat_interleave(3),
               encoder_hidden_states=cond, return_dict=False)[0]
    text, image, uncond = eps.view(n, 3, *eps.shape[1:]).unbind(1)
    guided = (uncond + (col(5) * (text - image)).to(dtype)) + (col(6) * (image - uncond)).to(dtype)
    sample = latents.float()
    denoised = sample - (col(2) * guided).to(dtype)
    moved = sample + (sample - denoised) / col(2) * col(3)
    return (moved + (noise * col(4)).to(dtype)).to(dtype)


def _cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without the copy for a lone tensor (a lone job's step inputs, 100 steps an edit)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


@dataclasses.dataclass(frozen=True, eq=False)
class DenoiseJob:
    """What ``MgiePipeline.start_denoising`` needs of one job."""

    image: ImageInput
    prompt_embeds: torch.Tensor
    seed: int
    text_cfg: float
    image_cfg: float
    steps: int
    tag: object = None


@dataclasses.dataclass(eq=False)
class DenoiseState:
    """One job part-way through denoising."""

    tag: object
    scheduler: object
    latents: torch.Tensor
    image_latents: torch.Tensor
    cond: torch.Tensor
    guided: bool
    text_cfg: float
    image_cfg: float
    step_kwargs: dict
    index: int = 0
    generator: torch.Generator | None = None  # fused path: the job's, for each step's ancestral noise
    scalars: torch.Tensor | None = None  # fused path: per-step timestep, sigmas and CFGs

    @property
    def total(self) -> int:
        """The job's step count."""
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        """Whether every step has been taken."""
        return self.index >= self.total

    @property
    def size(self) -> tuple[int, int]:
        """The latents' (height, width): jobs step together only at one size."""
        return tuple(self.latents.shape[-2:])


class Denoiser:
    """Starts jobs and steps them; compiled (``graphs``), the steps replay CUDA graphs per bucket."""

    def __init__(self, models: MgieModels, unet: torch.nn.Module, graphs: bool, max_side: int,
                 size_step: int | None = None) -> None:
        self.models, self.unet, self.graphs = models, unet, graphs
        raw_unet = models.unet

        def guided_step(*tensors: torch.Tensor) -> torch.Tensor:
            return guided_euler_ancestral_step(raw_unet, *tensors)

        def static_step(*tensors: torch.Tensor) -> torch.Tensor:  # its own code object, so its own compiled cache
            return guided_euler_ancestral_step(raw_unet, *tensors)

        # The whole guided step as one graph (the ~20 small kernels of CFG and the update would otherwise run
        # per job per step), compiled twice: with symbolic sizes for any shape, and with static ones for the
        # home shape (a max-side square) at the job counts the warm-up ran, which is faster (bench/NOTES.md,
        # "Static step"). Dynamo tries its newest entry first, so one compiled function would run the home
        # shape on the symbolic graph once that exists.
        self._guided_step = torch.compile(guided_step, options=UNET_COMPILE_OPTIONS) if graphs else guided_step
        self._static_step = torch.compile(static_step, options=STATIC_STEP_OPTIONS, dynamic=False) if graphs \
            else static_step
        factor = models.vae_scale_factor
        side = snap_size(*fit_size(max_side, max_side, max_side, factor), size_step or factor, max_side)[0] // factor
        self._home_latents = (side, side)
        self.static_jobs: set[int] = set()  # padded job counts the static step serves (set by the warm-up)
        self.saved: SavedSteps | None = None  # steps compiled ahead of time, when compiled (MGIE_COMPILE_AOT)
        self._pads: dict[tuple, tuple[list[torch.Tensor], ...]] = {}
        self._schedulers: dict[int, Any] = {}
        self._schedules: dict[int, torch.Tensor] = {}  # step count -> _step_scalars' first five columns
        self._fusable = (models.scheduler_class.__name__ == "EulerAncestralDiscreteScheduler"
                         and models.scheduler_config.get("prediction_type", "epsilon") == "epsilon")
        step_params = set(inspect.signature(models.scheduler_class.step).parameters)
        self._step_takes_generator = "generator" in step_params
        self._step_takes_eta = "eta" in step_params

    def padded(self, jobs: int) -> int:
        """The job count a fused step runs ``jobs`` at: compiled, the next bucket (one CUDA graph each)."""
        return next((b for b in JOB_BUCKETS if b >= jobs), jobs) if self.graphs else jobs

    # -- starting ------------------------------------------------------------------------------------
    def start(self, job: DenoiseJob, image_latents: torch.Tensor) -> DenoiseState:
        """Everything one job needs to take denoising steps, alone or batched with others."""
        m = self.models
        scheduler = self._scheduler_for(job.steps)
        # As in diffusers: guidance is on only when text_cfg > 1 and image_cfg >= 1.
        text_cfg, image_cfg = job.text_cfg, job.image_cfg
        guided = text_cfg > 1.0 and image_cfg >= 1.0
        cond = job.prompt_embeds.to(m.dtype)
        if guided:
            cond = torch.cat([cond, m.null_embeds, m.null_embeds])
            image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])

        generator = torch.Generator(device=m.device).manual_seed(job.seed)
        shape = (1, m.vae.config.latent_channels, *image_latents.shape[-2:])
        latents = randn_tensor(shape, generator=generator, device=m.device, dtype=m.dtype) * scheduler.init_noise_sigma
        if guided and self._fusable:
            # Each step draws its ancestral noise from the job's generator (``_fused_step``), in the order the
            # scheduler would: drawn here ahead, a burst's start would launch 3200 of them at once.
            return DenoiseState(tag=job.tag, scheduler=scheduler, latents=latents, image_latents=image_latents,
                                cond=cond, guided=True, text_cfg=text_cfg, image_cfg=image_cfg, step_kwargs={},
                                generator=generator, scalars=self._step_scalars(scheduler, text_cfg, image_cfg))
        extra = {}
        if self._step_takes_generator:
            extra["generator"] = generator
        if self._step_takes_eta:
            extra["eta"] = 0.0
        return DenoiseState(tag=job.tag, scheduler=scheduler, latents=latents, image_latents=image_latents, cond=cond,
                            guided=guided, text_cfg=text_cfg, image_cfg=image_cfg, step_kwargs=extra)

    def _scheduler_for(self, steps: int) -> Any:
        """A fresh scheduler set to ``steps``: a copy of one configured per step count, since building
        one from its config (signature inspection) costs milliseconds a job, and a burst starts 32."""
        template = self._schedulers.get(steps)
        if template is None:
            template = self.models.new_scheduler()
            template.set_timesteps(steps, device=self.models.device)
            self._schedulers[steps] = template
        return copy.deepcopy(template)

    def _step_scalars(self, scheduler, text_cfg: float, image_cfg: float) -> torch.Tensor:
        """Per step: timestep, input scale, sigma, dt, sigma_up, CFGs (``guided_euler_ancestral_step``'s
        ``scalars``), computed in float32 on the CPU as the scheduler computes them, once per step count (reading
        the scheduler's sigmas back from the GPU would wait for all queued work)."""
        steps = len(scheduler.timesteps)
        schedule = self._schedules.get(steps)
        if schedule is None:
            sigma, sigma_to = scheduler.sigmas[:-1].float().cpu(), scheduler.sigmas[1:].float().cpu()
            sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            schedule = torch.stack([scheduler.timesteps.float().cpu(), (sigma**2 + 1) ** 0.5, sigma, sigma_down - sigma,
                                    sigma_up], dim=1)
            self._schedules[steps] = schedule
        cfgs = torch.tensor([[float(text_cfg), float(image_cfg)]]).expand(steps, 2)
        return torch.cat([schedule, cfgs], dim=1).to(self.models.device)

    # -- stepping ------------------------------------------------------------------------------------
    def step(self, states: Sequence[DenoiseState]) -> None:
        """One denoising step for each state: guided jobs in one fused call, any others in one UNet call."""
        fused = [s for s in states if s.scalars is not None]
        if fused:
            self._fused_step(fused)
        others = [s for s in states if s.scalars is None]
        if others:
            self._scheduler_step(others)

    def _fused_step(self, states: Sequence[DenoiseState]) -> None:
        n = len(states)
        pad = self.padded(n) - n
        pads = self._bucket_padding(states[0], pad) if pad else ([], [], [], [], [])
        latents = _cat_rows([s.latents for s in states] + pads[0])
        image_latents = _cat_rows([s.image_latents for s in states] + pads[1])
        cond = _cat_rows([s.cond for s in states] + pads[2])
        # Always a fresh tensor: a row of a job's table sits at an unaligned offset, a new input to the compiler.
        scalars = torch.cat([s.scalars[s.index:s.index + 1] for s in states] + pads[3])
        # torch.randn is what randn_tensor (the scheduler's draw) calls for one generator on the job's device.
        noise = _cat_rows([torch.randn(s.latents.shape, generator=s.generator, device=s.latents.device,
                                       dtype=s.latents.dtype) for s in states] + pads[4])
        static = n + pad in self.static_jobs and tuple(latents.shape[-2:]) == self._home_latents
        args = (latents, image_latents, cond, scalars, noise)
        out = self._saved_run("static" if static else "symbolic", args)
        if out is None:
            if not static:
                mark_sizes_dynamic(*args)
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = (self._static_step if static else self._guided_step)(*args)
        out = out[:n].clone() if self.graphs else out  # the graph's output buffer is reused by the next replay
        for i, s in enumerate(states):
            s.latents = out[i:i + 1]
            s.index += 1

    def _bucket_padding(self, first: DenoiseState, pad: int) -> tuple[list[torch.Tensor], ...]:
        """Rows that fill a job bucket, made once per shape (never written to: torch.cat copies them)."""
        key = (pad, tuple(first.latents.shape[1:]), tuple(first.cond.shape[1:]))
        if key not in self._pads:
            self._pads[key] = ([first.latents.new_zeros(pad, *first.latents.shape[1:])],
                               [first.image_latents.new_zeros(3 * pad, *first.image_latents.shape[1:])],
                               [first.cond.new_zeros(3 * pad, *first.cond.shape[1:])],
                               [first.scalars.new_tensor([_PAD_SCALARS] * pad)],
                               [first.latents.new_zeros(pad, *first.latents.shape[1:])])
        return self._pads[key]

    def _scheduler_step(self, states: Sequence[DenoiseState]) -> None:
        """The general path: any scheduler, unguided jobs; one UNet call, then each job's own step."""
        rows, timesteps, conds, sizes = [], [], [], []
        for s in states:
            t = s.scheduler.timesteps[s.index]
            x = torch.cat([s.latents] * 3) if s.guided else s.latents
            rows.append(torch.cat([s.scheduler.scale_model_input(x, t), s.image_latents], dim=1))
            timesteps.append(t.reshape(1).expand(x.shape[0]))
            conds.append(s.cond)
            sizes.append(x.shape[0])
        noise = self._unet_call(torch.cat(rows), torch.cat(timesteps), torch.cat(conds))
        for s, pred in zip(states, noise.split(sizes), strict=True):
            if s.guided:
                text, img, uncond = pred.chunk(3)
                pred = uncond + s.text_cfg * (text - img) + s.image_cfg * (img - uncond)
            t = s.scheduler.timesteps[s.index]
            s.latents = s.scheduler.step(pred, t, s.latents, **s.step_kwargs, return_dict=False)[0]
            s.index += 1

    def _unet_call(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One UNet call; compiled, the batch is padded to a bucket so a few recorded CUDA graphs serve
        every batch size."""
        rows = sample.shape[0]
        # At least 3 rows: a lone unguided job (rare: a text CFG of 1 or an image CFG below 1) would otherwise
        # need a batch-of-one compile of its own (minutes; dynamo never lets a symbolic size stand for 1),
        # and at this size the call is bound by its launches, so the padding costs next to nothing.
        bucket = next((b for b in ROW_BUCKETS if b >= max(rows, 2)), rows) if self.graphs else rows
        if bucket > rows:
            extra = bucket - rows
            sample = torch.cat([sample, sample.new_zeros(extra, *sample.shape[1:])])
            timestep = torch.cat([timestep, timestep.new_zeros(extra)])
            cond = torch.cat([cond, cond.new_zeros(extra, *cond.shape[1:])])
        out = self._saved_run("plain", (sample, timestep, cond))
        if out is None:
            mark_sizes_dynamic(sample, timestep, cond)
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = self.unet(sample, timestep, encoder_hidden_states=cond, return_dict=False)[0]
        return out[:rows].clone() if self.graphs else out  # the graph's output buffer is reused by the next replay

    def _saved_run(self, kind: str, args: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The call through a step compiled ahead of time (saved_steps.py), or None: the caller's own. Saved
        steps take unmarked tensors: a lone job's own tensors may carry the marks of an earlier
        ``torch.compile`` call, which a new alias does not."""
        return self.saved.run(kind, tuple(t.detach() for t in args)) if self.saved is not None else None
