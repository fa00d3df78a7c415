"""GPU faults injected from the tests: a worker's pipeline methods wrapped to call a hook first.

``inject_faults(worker, hook)`` calls ``hook(stage, job_ids)`` before each GPU call the worker makes,
where it may raise (out of memory, a CUDA error) or hang. Stages: "language" (the language batch),
"start" (starting denoising), "step" (a denoising step), "retry" (a job's step alone after its batch ran
out of memory) and "decode" (queuing a VAE decode). Production code has no hook of its own.
"""

from __future__ import annotations

from collections.abc import Callable

Hook = Callable[[str, list[str]], None]


class _Injector:
    def __init__(self, worker, hook: Hook) -> None:
        self.hook = hook
        self.job_of: dict[int, tuple[object, str]] = {}  # id(object) -> (the object, kept alive; job id)
        self.retrying: set[str] = set()  # jobs whose batched step ran out of memory: their next step is a retry
        prepare = worker._prepare_input

        def prepare_input(job):
            image = prepare(job)
            self.job_of[id(image)] = (image, job.job_id)
            return image

        worker._prepare_input = prepare_input

    def _jobs(self, objects) -> list[str]:
        return [self.job_of[id(o)][1] for o in objects if id(o) in self.job_of and self.job_of[id(o)][0] is o]

    def wrap(self, pipe) -> None:
        """Wrap this pipeline's batched GPU calls (once)."""
        if getattr(pipe, "_faults_injected", False):
            return
        pipe._faults_injected = True
        guidance, start, step, decode = pipe.guidance, pipe.start_denoising, pipe.denoise_step, pipe.decode_queued

        def guidance_hooked(prompts, *args, **kwargs):
            self.hook("language", self._jobs([p.image for p in prompts]))
            return guidance(prompts, *args, **kwargs)

        def start_hooked(jobs):
            self.hook("start", [job.tag.job.job_id for job in jobs])
            return start(jobs)

        def step_hooked(states):
            ids = [s.tag.job.job_id for s in states]
            stage = "retry" if len(ids) == 1 and ids[0] in self.retrying else "step"
            self.retrying.difference_update(ids)
            try:
                self.hook(stage, ids)
                step(states)
            except Exception as err:
                if len(ids) > 1 and "out of memory" in str(err).lower():
                    self.retrying.update(ids)
                raise
            for s, job_id in zip(states, ids, strict=True):
                self.job_of[id(s.latents)] = (s.latents, job_id)

        def decode_hooked(latents):
            self.hook("decode", self._jobs(latents))
            return decode(latents)

        pipe.guidance, pipe.start_denoising = guidance_hooked, start_hooked
        pipe.denoise_step, pipe.decode_queued = step_hooked, decode_hooked


def inject_faults(worker, hook: Hook) -> None:
    """From now on (or from load, for a worker not yet loaded), ``hook`` runs before the worker's GPU calls;
    a second call on the same worker replaces the hook."""
    injector = getattr(worker, "_fault_injector", None)
    if injector is not None:
        injector.hook = hook
        return
    injector = worker._fault_injector = _Injector(worker, hook)
    if worker.pipeline is not None:
        injector.wrap(worker.pipeline)
    use_pipeline = worker._use_pipeline

    def wrapped_use_pipeline(pipeline):
        injector.wrap(pipeline)
        use_pipeline(pipeline)

    worker._use_pipeline = wrapped_use_pipeline
