"""The MGIE edit, top to bottom: image -> expressive instruction + visual tokens -> edited image.

``MgiePipeline.__call__`` reads like diffusers' pipelines and is built from the same batched calls a
worker makes for many jobs at once (``worker_loop.py``): ``guidance`` (language.py), ``start_denoising``
and ``denoise_step`` (denoiser.py), ``decode_queued`` (vae.py). Its denoising steps reproduce
``StableDiffusionInstructPix2PixPipeline`` and its language stage the demo's ``generate`` call (the parity
tests hold them to both).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from .compilation import prepare_for_cuda
from .cpu_pools import cpu_pool
from .denoiser import DenoiseJob, Denoiser, DenoiseState
from .errors import JobCancelledError
from .fx_threads import install as keep_fx_tracing_to_its_thread
from .images import prepare_image, snap_size
from .inputs import History, ImageInput, PreparedImage, Prompt
from .instructions import normalize_instruction
from .language import CancelToken, Guidance, LanguageStage
from .models import MgieModels
from .offload import StageResidency
from .options import DEFAULT_SEED, check_options
from .vae import VaeCodec
from .warm_up import warm_up

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One edit as a caller asks for it."""

    image: PIL.Image.Image
    instruction: str
    seed: int = DEFAULT_SEED
    text_cfg: float = 7.5
    image_cfg: float = 1.5
    steps: int = 100
    history: History = ()


@dataclasses.dataclass
class EditResult:
    """The edited image and everything that made it."""

    image: PIL.Image.Image
    expressive_instruction: str
    instruction: str
    seed: int
    text_cfg: float
    image_cfg: float
    steps: int
    width: int
    height: int
    timings: dict[str, float]
    llm_cached: bool


def check_request(request: EditRequest) -> EditRequest:
    """Range checks with messages fit for a user; returns the request with a normalized instruction."""
    check_options(request.text_cfg, request.image_cfg, request.steps, request.seed)
    history = tuple((normalize_instruction(i), str(a)) for i, a in request.history)
    return dataclasses.replace(request, instruction=normalize_instruction(request.instruction), history=history)


class MgiePipeline:
    """Runs edits on loaded models. Thread-safe for one caller at a time per GPU (the worker's job).

    The stages: ``language`` (CLIP, the LLM and the edit head, with the guidance cache), ``denoiser``
    (UNet steps) and ``vae`` (encodes and decodes). With ``offload`` the LLM and the UNet/VAE take
    turns on the GPU (offload.py); with ``compile_unet`` on CUDA the steps are compiled CUDA graphs.
    """

    def __init__(self, models: MgieModels, max_side: int = 512, guidance_cache_size: int = 64,
                 compile_unet: bool = False, offload: bool = False, size_step: int | None = None) -> None:
        self.models = models
        self.max_side = max_side
        # The working sizes' grid (images.snap_size), a multiple of the VAE's factor; None: that factor, so
        # the working size is the fitted one. Pipelines that share jobs (eager, compiled) must share it.
        factor = models.vae_scale_factor
        self.size_step = -(-(size_step or factor) // factor) * factor
        self.compile_unet = compile_unet  # asked for; ``compiles`` says whether it happens (CUDA, no offload)
        self.stop_warm_up: threading.Event | None = None  # set, ``warm_up`` stops between batches
        self.before_warm_up_batch: Callable[[], object] | None = None  # called by ``warm_up`` before each batch
        if compile_unet:  # its compiles may run beside eager modules in other threads (fx_threads.py)
            keep_fx_tracing_to_its_thread()
        cuda = models.device.type == "cuda"
        graphs = compile_unet and cuda and not offload
        unet = prepare_for_cuda(models, graphs)
        # CLIP, the edit head and one job's VAE encode and decode are replayed as CUDA graphs (graphs.py),
        # but not under offload, where the weights they read come and go.
        recorded = cuda and not offload
        self.language = LanguageStage(models, self.prepare, self._use_stage, compile_layers=compile_unet and cuda,
                                      recorded=recorded, cache_size=guidance_cache_size)
        self.language.decoder.pack()  # before the residency takes its host copies, so packed blocks move as one
        # Offload: the UNet then runs eagerly, since its CUDA graphs would hold the addresses of weights
        # that come and go.
        self.residency: StageResidency | None = None
        if offload:
            self.residency = StageResidency({"language": [models.llm], "diffusion": [models.unet, models.vae]},
                                            models.device)
            self.language.decoder.forget_graphs()  # its packed weights are the GPU copies just let go
        self.denoiser = Denoiser(models, unet, graphs, max_side, self.size_step)
        self.image_processor = VaeImageProcessor(vae_scale_factor=models.vae_scale_factor)
        self.vae = VaeCodec(models.vae, models.device, models.dtype, self.image_processor, compiled=graphs,
                            recorded=recorded)

    @property
    def compiles(self) -> bool:
        """True when steps run compiled CUDA graphs, whose first use of a shape compiles or records."""
        return self.denoiser.graphs

    def _use_stage(self, group: str) -> None:
        """With offload, bring this stage's models to the GPU. The decoder lets go of its graphs, cache
        and packed weights first: they point at the copies about to leave, and would keep them on the card
        (9 GiB of the LLM, next to the copy coming in: out of memory on a 16 GB card)."""
        if self.residency is not None and self.residency.active != group:
            self.language.decoder.forget_graphs()
            self.residency.use(group)

    # -- inputs --------------------------------------------------------------------------------------
    def prepare(self, image: ImageInput, output_size: tuple[int, int] | None = None) -> PreparedImage:
        """The CPU side of both stages for an image already fitted (``images.prepare_image``); thread-safe.
        ``output_size``: (width, height) to deliver the result at, if not the image's. An image already
        prepared is returned as it is."""
        if isinstance(image, PreparedImage):
            return image
        vae_batch = cpu_pool("vae-pixels").submit(self.image_processor.preprocess, [image])
        return PreparedImage(
            image=image, key=hashlib.sha256(image.tobytes()).hexdigest(),
            clip_pixels=self.models.vision_processor.preprocess([image], return_tensors="pt")["pixel_values"][0],
            vae_batch=vae_batch, output_size=output_size)

    def fit_and_prepare(self, image: PIL.Image.Image) -> PreparedImage:
        """Any input image, fitted to this pipeline's size (``images.prepare_image``), snapped to its working
        grid (``images.snap_size``: fewer CUDA graphs on a compiling worker), then ``prepare``d; the result
        is to be delivered at the fitted size."""
        fitted = prepare_image(image, self.max_side, self.models.vae_scale_factor)
        working = snap_size(*fitted.size, self.size_step, self.max_side)
        if working == fitted.size:
            return self.prepare(fitted)
        return self.prepare(fitted.resize(working, PIL.Image.Resampling.LANCZOS), output_size=fitted.size)

    def warm_up(self, max_jobs: int = 1, only: Collection[int] | None = None) -> None:
        """Compile every class of shape a worker taking ``max_jobs`` jobs a step meets (warm_up.py);
        ``only``: those warm-up batches."""
        warm_up(self, max_jobs, only)

    # -- the whole edit ------------------------------------------------------------------------------
    def __call__(self, request: EditRequest, progress: ProgressFn | None = None,
                 cancel: CancelToken | None = None) -> EditResult:
        """One edit, through the same batched calls a worker makes for many jobs."""
        timings: dict[str, float] = {}
        clock = _StageClock(self.models.device, timings)
        progress = progress or (lambda stage, k, n: None)

        # 1. Check the options and fit the image (aspect ratio kept, sides a multiple of the VAE factor), then
        #    snap it to the working grid (the result is resized back to the fitted size).
        request = check_request(request)
        with clock("preprocess"):
            image = self.fit_and_prepare(request.image)

        # 2. CLIP + LLaVA write the expressive instruction; the edit head turns it into UNet conditioning.
        progress("language", 0, 1)
        with clock("llm"):
            [(guidance, cached)] = self.guidance([Prompt(image, request.instruction, request.history)], cancel)
        progress("language", 1, 1)

        # 3. InstructPix2Pix denoising with 3-way classifier-free guidance, then the VAE decode.
        with clock("denoise"):
            [state] = self.start_denoising([DenoiseJob(image, guidance.prompt_embeds, request.seed,
                                                       request.text_cfg, request.image_cfg, request.steps)])
            while not state.done:
                self.denoise_step([state])
                progress("denoise", state.index, state.total)
                if cancel is not None and cancel.is_set():
                    raise JobCancelledError("The edit was cancelled.")
        progress("decode", 0, 1)
        with clock("vae_decode"):
            [edited] = self.decode_queued([state.latents])()
            if edited.size != image.delivered_size:  # back from the working grid to the fitted size
                edited = edited.resize(image.delivered_size, PIL.Image.Resampling.LANCZOS)
        timings["total"] = sum(timings.values())
        return EditResult(
            image=edited, expressive_instruction=guidance.expressive_instruction, instruction=request.instruction,
            seed=request.seed, text_cfg=request.text_cfg, image_cfg=request.image_cfg, steps=request.steps,
            width=edited.width, height=edited.height, timings=timings, llm_cached=cached,
        )

    # -- the stages, each for many jobs at once ------------------------------------------------------
    def guidance(self, prompts: Sequence[Prompt], cancel: CancelToken | None = None,
                 use_cache: bool = True) -> list[tuple[Guidance, bool]]:
        """The language stage's output per prompt, and whether it came from the cache (language.py)."""
        return self.language.guidance(prompts, cancel, use_cache)

    def prompt_inputs(self, prompts: Sequence[Prompt]) -> list[tuple[list[int], torch.Tensor]]:
        """Per prompt, the LLM's token ids and input embeddings (CLIP features in the image's place)."""
        return self.language.prompt_inputs(prompts)

    @torch.inference_mode()
    def start_denoising(self, jobs: Sequence[DenoiseJob]) -> list[DenoiseState]:
        """Everything each job needs to take denoising steps, alone or batched with others; images of one
        size are VAE-encoded together."""
        self._use_stage("diffusion")
        latents = self.vae.encode([self.prepare(job.image) for job in jobs])
        return [self.denoiser.start(job, image_latents) for job, image_latents in zip(jobs, latents, strict=True)]

    @torch.inference_mode()
    def denoise_step(self, states: Sequence[DenoiseState]) -> None:
        """One denoising step for each state: guided jobs in one fused call, any others in one UNet call.

        States must share a latent size. Each keeps its own generator, timestep and CFG scales, so a
        job's result does not depend on what else is in the batch.
        """
        self._use_stage("diffusion")
        self.denoiser.step(states)

    @torch.inference_mode()
    def decode_queued(self, latents: Sequence[torch.Tensor]) -> Callable[[], list[PIL.Image.Image]]:
        """Queue one VAE decode of several jobs' latents (one size); the function returned waits for it
        and gives the images (vae.py)."""
        self._use_stage("diffusion")
        return self.vae.decode_queued(latents)

    def decode(self, latents: Sequence[torch.Tensor]) -> list[PIL.Image.Image]:
        """Several jobs' latents (one size) through one VAE decode, waited for."""
        return self.decode_queued(latents)()


class _StageClock:
    """Wall time per stage; synchronizes CUDA so GPU work is charged to the stage that queued it."""

    def __init__(self, device: torch.device, timings: dict[str, float]) -> None:
        self.device, self.timings = device, timings

    def __call__(self, stage: str) -> _StageClock:
        self.stage = stage
        return self

    def __enter__(self) -> None:
        self.label = torch.profiler.record_function(self.stage)  # names the stage in any profile
        self.label.__enter__()
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + time.perf_counter() - self.start
        self.label.__exit__(*exc)
