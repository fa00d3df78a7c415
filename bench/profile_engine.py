"""Where an edit's GPU time goes: a profile of one edit plus UNet, LLM and VAE variants, full size, one GPU.

    python3 bench/profile_engine.py --tokenizer-dir DIR [--out DIR] [--budget SECONDS]
        [--only-unet [--variants LIST] [--rows 3,96] | --only-llm | --only-vae | --only-kernels]

Prints, per stage, wall time against the time the GPU was busy (a gap means Python or launch
overhead, not kernels), the heaviest kernels, and UNet call times at batch 3 and 96 for several
variants (eager, CUDA graphs, cudnn autotuning, fused QKV, max-autotune, static against symbolic sizes); the
decoder eager against compiled, with the [IMG] run checked in one pass or not, and after a second
prompt width; the VAE eager against compiled. Kernel time is also split by kind (convolution,
matmul, attention, inductor's fused kernels). A tool for choosing the next lever; the numbers that
count are mgie_bench.py's.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests" / "support")]
import mgie_bench  # noqa: E402
from full_size import build  # noqa: E402
from mgie_bench import item, pipe_image, run_engine, sync, warm_up_home_shape_only  # noqa: E402

from mgie_engine.compilation import STATIC_STEP_OPTIONS, UNET_COMPILE_OPTIONS  # noqa: E402
from mgie_engine.denoiser import DenoiseJob  # noqa: E402
from mgie_engine.inputs import Prompt  # noqa: E402
from mgie_engine.pipeline import MgiePipeline  # noqa: E402

LOG: list[str] = []


def say(*parts: object) -> None:
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


def gpu_time(fn, repeat: int = 10) -> float:
    """Median milliseconds of fn() between CUDA events, after two warm-up calls."""
    fn(), fn()
    times = []
    if not torch.cuda.is_available():  # a dry run of the script on a CPU
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def busy_by_stage(trace: dict, stages: tuple[str, ...]) -> dict:
    """Per stage window (a record_function range): wall ms, GPU-busy ms and the top kernels."""
    events = trace["traceEvents"]
    windows = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events
               if e.get("ph") == "X" and e.get("name") in stages and e.get("cat") == "user_annotation"}
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("ph") == "X" and e.get("cat") == "kernel")
    out = {}
    for stage, (lo, hi) in windows.items():
        busy, cursor, names, kinds = 0.0, lo, collections.Counter(), collections.Counter()
        for a, b, name in kernels:
            a, b = max(a, lo), min(b, hi)
            if b <= a:
                continue
            names[name[:90]] += b - a
            kinds[kernel_kind(name)] += b - a
            if b > cursor:
                busy += b - max(a, cursor)
                cursor = b
        out[stage] = {"wall_ms": (hi - lo) / 1000, "gpu_busy_ms": busy / 1000,
                      "kernels": sum(1 for a, b, _ in kernels if lo <= a < hi),
                      "top": [(n, round(t / 1000, 2)) for n, t in names.most_common(12)],
                      "kinds": {k: round(t / 1000, 2) for k, t in kinds.most_common()}}
    return out


def kernel_kind(name: str) -> str:
    """A kernel's family, to see whether a step's time is in convolutions, matmuls, attention or the
    fused elementwise and norm kernels inductor writes."""
    lowered = name.lower()
    for kind, marks in (("attention", ("sdpa", "flash", "fmha", "attention")),
                        ("convolution", ("fprop", "conv", "implicit_gemm")),
                        ("matmul", ("nvjet", "gemm", "gemv", "cublas", "splitk")),
                        ("inductor", ("triton",))):
        if any(m in lowered for m in marks):
            return kind
    return "other"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--only-unet", action="store_true", help="just the UNet variants")
    p.add_argument("--only-llm", action="store_true", help="just the decoder: eager against compiled layers")
    p.add_argument("--only-vae", action="store_true", help="just the VAE: eager against compiled, NCHW and NHWC")
    p.add_argument("--only-kernels", action="store_true",
                   help="just kernel choices, no models: attention backends at the UNet's and decoder's shapes, "
                        "the decoder's batch-1 matmuls in cuBLAS against autotuned ones")
    p.add_argument("--variants", default="graphs,conv1x1mm,coordinate",
                   help="comma list of: eager, graphs, conv1x1mm, coordinate, combo, aggressive, fused_qkv, autotune, "
                        "engine (static, the engine's options), home (the home step's), pdl, homepdl (programmatic "
                        "dependent launch), flash, efficient (the attention kernel), "
                        "layout (or one of its parts: static, nolayout, symbolic, forced)")
    p.add_argument("--rows", default="3,96", help="UNet batch sizes to time each variant at")
    p.add_argument("--layout-off", action="store_true", help="combo and aggressive without layout optimization")
    p.add_argument("--sustain", type=int, default=0, help="also time this many back-to-back calls at 32+ rows")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; later variants are skipped past it")
    args = p.parse_args()
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda:0" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    if args.only_kernels:
        report = {"card": torch.cuda.get_device_name(0) if cuda else "cpu (dry run, small dims)"}
        kernel_variants(dev, dtype, report)
        return finish(args, t_start, report)
    if not cuda:  # a dry run: the same code paths on small images (mgie_bench's items and the pipeline)
        mgie_bench.SIDE = 64
    models = build(dev, dtype, args.tokenizer_dir, small=not cuda)
    report: dict = {"card": torch.cuda.get_device_name(0) if cuda else "cpu (dry run, small dims)"}

    if args.only_vae:
        vae_variants(models, report)
        return finish(args, t_start, report)
    pipe = MgiePipeline(models, max_side=mgie_bench.SIDE, compile_unet=True)
    if args.only_llm:
        decoder_variants(pipe, models, report)
    elif not args.only_unet:
        profile_stages(pipe, models, args, report)
    if not args.only_llm:
        unet_variants(models, dev, dtype, cuda, args, t_start, report)
    return finish(args, t_start, report)


def finish(args, t_start: float, report: dict) -> int:
    report["seconds"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "profile.log").write_text("\n".join(LOG) + "\n")
    return 0


def vae_variants(models, report: dict) -> None:
    """VAE decode (64x64 latents) and encode (512x512 pixels), ms per call: eager NCHW (the engine's
    choice uncompiled), compiled NCHW (the engine's choice compiled), compiled NHWC."""
    from mgie_engine.vae import vae_functions

    vae, out, cuda = models.vae, {}, models.device.type == "cuda"
    report["vae_ms"] = out
    side = 64 if cuda else 16
    with torch.inference_mode():
        for name, layout, compiled in (("eager_nchw", torch.contiguous_format, False),
                                       ("compiled_nchw", torch.contiguous_format, True),
                                       ("compiled_nhwc", torch.channels_last, True)):
            torch._dynamo.reset()
            vae.to(memory_format=layout)
            encode, decode = vae_functions(vae, compiled=compiled)
            for n in (1, 4, 8):
                latents = torch.randn(n, 4, side, side, device=models.device, dtype=models.dtype)
                pixels = torch.randn(n, 3, side * 8, side * 8, device=models.device, dtype=models.dtype)
                for op, fn, x in (("decode", decode, latents), ("encode", encode, pixels)):
                    t0 = time.perf_counter()
                    ms = gpu_time(lambda fn=fn, x=x: fn(x), repeat=5)
                    out[f"{op}_{name}_batch{n}"] = ms
                    say(f"VAE {op} {name} batch {n}: {ms:.1f} ms (incl. build {time.perf_counter() - t0:.0f} s)")
        vae.to(memory_format=torch.contiguous_format)


# SD-1.5's UNet on 64x64 latents: (tokens, heads, head dim, transformer blocks) per resolution; each block has
# a self-attention over its tokens and a cross-attention over the 77 conditioning states.
UNET_ATTENTION = ((4096, 8, 40, 5), (1024, 8, 80, 5), (256, 8, 160, 5), (64, 8, 160, 1))
SDP_BACKENDS = ("cudnn", "flash", "efficient")


def sdpa_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, mask: torch.Tensor | None = None
            ) -> float | None:
    """One attention call's GPU time with only ``backend`` allowed; None where it cannot run the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    try:
        with sdpa_kernel([chosen]):
            return gpu_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    except RuntimeError:
        return None


def kernel_variants(dev: torch.device, dtype: torch.dtype, report: dict) -> None:
    """Kernel choices timed alone (seconds, not a compile each): which attention backend is fastest at the
    UNet's shapes (one edit's 3 rows, a burst's 96) and at the decoder's token step with its cache mask,
    and how close the batch-1 token step's matmuls come to the card's bandwidth in cuBLAS and autotuned."""
    cuda = dev.type == "cuda"
    out: dict = {}
    report["kernels"] = out
    scale = 1 if cuda else 16  # a dry run on a CPU shrinks every size
    with torch.inference_mode():
        for rows in (3, 96) if cuda else (3,):
            totals = dict.fromkeys(SDP_BACKENDS, 0.0)
            for tokens, heads, dim, blocks in UNET_ATTENTION:
                tokens = max(1, tokens // scale)
                # As diffusers' attention processor hands them over: (rows, tokens, heads, dim) transposed.
                q = torch.randn(rows, tokens, heads, dim, device=dev, dtype=dtype).transpose(1, 2)
                ctx = torch.randn(rows, 77, heads, dim, device=dev, dtype=dtype).transpose(1, 2)
                line = []
                for backend in SDP_BACKENDS:
                    self_ms, cross_ms = sdpa_ms(q, q, q, backend), sdpa_ms(q, ctx, ctx, backend)
                    out[f"unet_rows{rows}_{tokens}x{dim}_{backend}"] = (self_ms, cross_ms)
                    if self_ms is None or cross_ms is None or totals[backend] is None:
                        totals[backend] = None
                    else:
                        totals[backend] += blocks * (self_ms + cross_ms)
                    line.append(f"{backend} " + ("n/a" if self_ms is None or cross_ms is None
                                                 else f"{self_ms:.3f}+{cross_ms:.3f}"))
                say(f"UNet attention, {rows} rows, {tokens} tokens x {heads} heads x {dim} (self+cross ms): "
                    + ", ".join(line))
            out[f"unet_rows{rows}_total_ms"] = totals
            say(f"UNet attention, {rows} rows, one call's 16 blocks: " + ", ".join(
                f"{b} {'n/a' if t is None else f'{t:.2f} ms'}" for b, t in totals.items()))
        # The decoder's token step: one query per row against the whole cache (480 columns), boolean mask.
        for n in (1, 32):
            q = torch.randn(n, 32 // (scale if not cuda else 1), 1, 128 // scale, device=dev, dtype=dtype)
            kv = torch.randn(n, q.shape[1], 480 // scale, q.shape[3], device=dev, dtype=dtype)
            mask = torch.ones(n, 1, 1, kv.shape[2], device=dev, dtype=torch.bool)
            mask[..., kv.shape[2] * 9 // 10:] = False
            line = []
            for backend in SDP_BACKENDS:
                ms = sdpa_ms(q, kv, kv, backend, mask)
                out[f"decode_batch{n}_{backend}"] = ms
                line.append(f"{backend} " + ("n/a" if ms is None else f"{ms * 1000:.1f} us"))
            say(f"decoder attention, batch {n}, one layer: " + ", ".join(line))
        # The batch-1 token step's matmuls (LLaMA-7B: q/k/v packed, o, gate/up packed, down, lm_head).
        hidden = 4096 // scale
        shapes = {"qkv": (3 * hidden, hidden), "o": (hidden, hidden), "gate_up": (2 * 11008 // scale, hidden),
                  "down": (hidden, 11008 // scale), "lm_head": (32000 // scale, hidden)}
        tuned = torch.compile(torch.nn.functional.linear, mode="max-autotune-no-cudagraphs") if cuda else None
        for name, (rows_out, cols) in shapes.items():
            w = torch.randn(rows_out, cols, device=dev, dtype=dtype)
            x = torch.randn(1, 1, cols, device=dev, dtype=dtype)
            gbytes = w.numel() * w.element_size() / 1e9
            ms = gpu_time(lambda w=w, x=x: torch.nn.functional.linear(x, w), repeat=50)
            line = f"cuBLAS {ms * 1000:.1f} us ({gbytes / ms:.2f} TB/s)"
            out[f"gemv_{name}_cublas_ms"] = ms
            if tuned is not None:
                try:
                    t_ms = gpu_time(lambda w=w, x=x: tuned(x, w), repeat=50)
                    same = torch.equal(tuned(x, w), torch.nn.functional.linear(x, w))
                    out[f"gemv_{name}_autotuned_ms"] = t_ms
                    line += f", autotuned {t_ms * 1000:.1f} us ({gbytes / t_ms:.2f} TB/s, same result: {same})"
                except Exception as exc:  # reported, not fatal
                    line += f", autotuned failed: {exc!r}"[:200]
            say(f"token step matmul {name} {rows_out}x{cols}: {line}")


def profile_stages(pipe: MgiePipeline, models, args, report: dict) -> None:
    cuda = models.device.type == "cuda"
    mem = torch.cuda if cuda else None
    # 1. One compiled edit, profiled, on the static kernels a worker runs a square edit on.
    warm_up_home_shape_only()
    pipe.warm_up(32 if cuda else 2)
    run_engine(pipe, [item(100), item(101)], args.steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        _, outs = run_engine(pipe, [item(102)], args.steps)
    prof.export_chrome_trace("/tmp/trace.json")
    # The language stage's parts (their record_function names in language.py and decoding.py): where the
    # GPU waits for the CPU. Its token loop is what the stage leaves besides these.
    stages = busy_by_stage(json.loads(Path("/tmp/trace.json").read_text()),
                           ("preprocess", "llm", "llm.prompt", "llm.prefill", "llm.edit_head", "denoise", "vae_decode"))
    report["profile"] = {"timings": outs[0].timings, "stages": stages}
    for name, s in stages.items():
        say(f"{name}: wall {s['wall_ms']:.1f} ms, GPU busy {s['gpu_busy_ms']:.1f} ms (idle "
            f"{s['wall_ms'] - s['gpu_busy_ms']:.1f} ms), {s['kernels']} kernels; by kind: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in s["kinds"].items()))
        for k, t in s["top"][:8]:
            say(f"    {t:8.2f} ms  {k}")

    # 2. Stage peaks (what offloading the LLM would leave on the card).
    if mem:
        mem.reset_peak_memory_stats()
    it = item(103)
    image = pipe_image(pipe, it)
    [(guidance, _)] = pipe.guidance([Prompt(image, it["instruction"])])
    report["peak_llm_gib"] = mem.max_memory_allocated() / 2**30 if mem else 0.0
    if mem:
        mem.reset_peak_memory_stats()
    [state] = pipe.start_denoising([DenoiseJob(image, guidance.prompt_embeds, 1, 7.5, 1.5, args.steps)])
    while not state.done:
        pipe.denoise_step([state])
    pipe.decode([state.latents])
    report["peak_denoise_gib"] = mem.max_memory_allocated() / 2**30 if mem else 0.0
    llm_bytes = sum(t.numel() * t.element_size() for t in models.llm.parameters())
    report["llm_weights_gib"] = llm_bytes / 2**30
    say(f"peak: llm stage {report['peak_llm_gib']:.1f} GiB, denoise stage {report['peak_denoise_gib']:.1f} GiB, "
        f"LLM weights {report['llm_weights_gib']:.1f} GiB")

    # 3. LLM stage at batch 1 and 32 (decode dominated).
    items = [item(500 + i) for i in range(32)]
    triples = [(pipe_image(pipe, x), x["instruction"], ()) for x in items]
    for n in (1, 32):
        run_llm(pipe, triples[:n])
        sync()
        t0 = time.perf_counter()
        run_llm(pipe, triples[:n])
        sync()
        report[f"llm_batch{n}_s"] = time.perf_counter() - t0
        say(f"LLM stage, batch {n}: {report[f'llm_batch{n}_s']:.3f} s")

    # 4. Denoise step with 32 jobs (96 UNet rows), against the UNet call alone.
    g = run_llm(pipe, triples[:1])[0]
    jobs = 32 if cuda else 2
    states = pipe.start_denoising([DenoiseJob(t[0], g.prompt_embeds, i, 7.5, 1.5, 100)
                                   for i, t in enumerate(triples[:jobs])])
    report[f"denoise_step_{jobs}_jobs_ms"] = gpu_time(lambda: pipe.denoise_step(states))
    say(f"denoise_step, {jobs} jobs: {report[f'denoise_step_{jobs}_jobs_ms']:.1f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.profiler.record_function("burst_step"):
            for _ in range(3):
                pipe.denoise_step(states)
            sync()
    prof.export_chrome_trace("/tmp/burst_trace.json")
    step = busy_by_stage(json.loads(Path("/tmp/burst_trace.json").read_text()), ("burst_step",))["burst_step"]
    report["burst_step_profile"] = step
    say(f"3 steps of {jobs} jobs: wall {step['wall_ms']:.1f} ms, GPU busy {step['gpu_busy_ms']:.1f} ms; by kind: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in step["kinds"].items()))
    for k, t in step["top"][:8]:
        say(f"    {t:8.2f} ms  {k}")


def run_llm(pipe: MgiePipeline, triples) -> list:
    """The language stage, decoded afresh, for (image, instruction, history) triples."""
    return [g for g, _ in pipe.guidance([Prompt(*t) for t in triples], use_cache=False)]


def decoder_variants(pipe: MgiePipeline, models, report: dict) -> None:
    """The LLM stage at batch 1 and 32 with eager layers, then compiled ones (same graphs otherwise)."""
    from mgie_engine import decoding
    from mgie_engine.language import NO_REPEAT_NGRAM
    from mgie_engine.warm_up import WARM_UP_PROMPTS

    cuda = models.device.type == "cuda"
    items = [item(500 + i) for i in range(32)]
    triples = [(pipe_image(pipe, x), x["instruction"], ()) for x in items]
    tokens = {}
    long_prompt = WARM_UP_PROMPTS[1]
    engine_options = decoding.LAYER_COMPILE_OPTIONS
    for label, compiled, checks in (("eager", False, True), ("no-check", True, False), ("compiled", True, True),
                                    ("2 widths", True, True), ("autotune", True, True)):
        # "no-check": compiled layers, but [IMG1]..[IMG7] decoded token by token instead of checked in one pass.
        # "2 widths": the compiled layers after a prompt of another width (the warm-up's long one), which
        # leaves dynamo a graph with a symbolic cache length, as a worker has after its warm-up.
        # "autotune": the layers' matmuls tuned against Triton templates (the GEMVs of a batch-1 step run at
        # ~2.8 TB/s in cuBLAS, short of the card's ~3.35).
        if label == "2 widths":
            run_llm(pipe, [(triples[0][0], *long_prompt)])
            engine_decoder = pipe.language.decoder
        else:
            decoding.LAYER_COMPILE_OPTIONS = {**engine_options, **({"max_autotune": True} if label == "autotune" else {})}
            pipe.language.decoder = decoding.GreedyDecoder(models.llm, NO_REPEAT_NGRAM, graphs=cuda,
                                                   compile_layers=compiled and cuda)
            decoding.LAYER_COMPILE_OPTIONS = engine_options
            pipe.language.decoder._checks = checks
        for n in (1, 32):
            t0 = time.perf_counter()
            out = run_llm(pipe, triples[:n])
            sync()
            first = time.perf_counter() - t0
            runs = []
            for _ in range(3 if cuda else 0):
                t0 = time.perf_counter()
                out = run_llm(pipe, triples[:n])
                sync()
                runs.append(time.perf_counter() - t0)
            runs = runs or [first]  # on a CPU the times mean nothing: the first call alone checks the code
            new = sum(len(g.new_token_ids) for g in out) / n
            tokens[(label, n)] = [g.new_token_ids for g in out]
            report[f"llm_{label}_batch{n}_s"] = statistics.median(runs)
            say(f"LLM stage {label:<9} batch {n:>2}: {statistics.median(runs):.3f} s median of {len(runs)} "
                f"(first call {first:.1f} s), {new:.0f} new tokens per row, "
                f"{statistics.median(runs) / new * 1000:.2f} ms per token step")
    # Where one token step's GPU time goes (the engine's step run without its graph, so kernels are named).
    pipe.language.decoder = engine_decoder
    if cuda:
        for n in (1, 32):
            profile_decode_step(pipe, triples[:n], report)
    for n in (1, 32):
        same = tokens[("eager", n)] == tokens[("compiled", n)] == tokens[("no-check", n)] == tokens[("2 widths", n)]
        report[f"llm_same_tokens_batch{n}"] = same
        report[f"llm_autotune_same_tokens_batch{n}"] = tokens[("autotune", n)] == tokens[("eager", n)]
        say(f"batch {n}: eager, compiled and run-checked decoding give the same tokens: {same}; "
            f"autotuned: {report[f'llm_autotune_same_tokens_batch{n}']}")


def profile_decode_step(pipe: MgiePipeline, triples, report: dict) -> None:
    """Where the LLM stage's time goes at this batch: the whole stage (wall against GPU busy) and one
    token step run without its graph, so its kernels are named."""
    n, decoder = len(triples), pipe.language.decoder
    run_llm(pipe, triples)
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.profiler.record_function("llm"):
            run_llm(pipe, triples)
            sync()
    prof.export_chrome_trace("/tmp/llm_trace.json")
    stage = busy_by_stage(json.loads(Path("/tmp/llm_trace.json").read_text()), ("llm",))["llm"]
    report[f"llm_stage_batch{n}"] = stage
    say(f"LLM stage batch {n}: wall {stage['wall_ms']:.1f} ms, GPU busy {stage['gpu_busy_ms']:.1f} ms, "
        f"{stage['kernels']} kernels")
    for k, t in stage["top"][:10]:
        say(f"    {t:8.2f} ms  {k}")
    with torch.inference_mode():  # the decoder's buffers are inference tensors
        b = next(reversed(decoder._shapes.values()))
        for _ in range(3):
            decoder._step(b)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                decoder._step(b)
            torch.cuda.synchronize()
    rows = sorted(((e.device_time_total / 5 / 1000, e.count // 5, e.key) for e in prof.key_averages()
                   if e.device_time_total > 0), reverse=True)
    report[f"decode_step_kernels_batch{n}"] = [(round(ms, 3), c, name[:100]) for ms, c, name in rows[:25]]
    say(f"one token step (batch {n}, compiled layers, no graph): {sum(ms for ms, _, _ in rows):.2f} ms of kernels; "
        f"top 12 of {len(rows)}:")
    for ms, count, name in rows[:12]:
        say(f"    {ms:7.3f} ms  x{count:<4} {name[:110]}")


def unet_variants(models, dev, dtype, cuda: bool, args, t_start: float, report: dict) -> None:
    unet = models.unet
    variants: dict = {}
    report["unet_ms"] = variants

    side = 64 if cuda else 16

    def inputs(rows: int):
        return (torch.randn(rows, 8, side, side, device=dev, dtype=dtype).to(memory_format=torch.channels_last),
                torch.full((rows,), 500.0, device=dev), torch.randn(rows, 77, 768, device=dev, dtype=dtype))

    def measure(label: str, fn, only_rows: int | None = None) -> None:
        if time.perf_counter() - t_start > args.budget or (not cuda and "eager" not in label):
            say(f"skip {label}: over budget, or compiled on a CPU (proves nothing)")
            return
        for rows in [int(r) for r in args.rows.split(",") if only_rows in (None, int(r))] if cuda else (3,):
            x, t, c = inputs(rows)

            def call(x=x, t=t, c=c):
                torch.compiler.cudagraph_mark_step_begin()
                return fn(x, t, encoder_hidden_states=c, return_dict=False)[0]

            try:
                t0 = time.perf_counter()
                ms = gpu_time(call)
            except Exception as exc:  # a variant that does not build is reported, not fatal
                say(f"{label} rows {rows}: failed: {exc!r}"[:300])
                continue
            variants[f"{label}/rows{rows}"] = ms
            say(f"UNet {label:<28} rows {rows:>2}: {ms:7.2f} ms  "
                f"({2.41 / 3 * rows / ms * 1000:.0f} TFLOP/s; incl. build {time.perf_counter() - t0:.0f} s)")
            if args.sustain and rows >= 32 and cuda:  # a burst's 100 calls back to back: does the card hold its clock?
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.sustain):
                    call()
                end.record()
                end.synchronize()
                held = start.elapsed_time(end) / args.sustain
                variants[f"{label}/rows{rows}/sustained{args.sustain}"] = held
                say(f"UNet {label:<28} rows {rows:>2}: {held:7.2f} ms a call over {args.sustain} calls back to back")

    import torch._inductor.config as inductor

    chosen = set(args.variants.split(","))
    with torch.inference_mode():
        if "eager" in chosen:
            measure("eager", unet)
        torch.backends.cudnn.benchmark = True
        if "graphs" in chosen:
            torch._dynamo.reset()
            measure("graphs+cudnn.benchmark", torch.compile(unet, mode="reduce-overhead"))
        inductor.conv_1x1_as_mm = True
        if "conv1x1mm" in chosen:
            torch._dynamo.reset()
            measure("graphs+conv_1x1_as_mm", torch.compile(unet, mode="reduce-overhead"))
        if "coordinate" in chosen:
            inductor.coordinate_descent_tuning = True
            torch._dynamo.reset()
            measure("graphs+conv1x1mm+coord_descent", torch.compile(unet, mode="reduce-overhead"))
            inductor.coordinate_descent_tuning = False
        # Fewer, larger kernels: at 3 rows most of a step's ~650 kernels are small norm and elementwise ones.
        # Static (as the home step), on top of the engine's options.
        base = {**UNET_COMPILE_OPTIONS, **({"layout_optimization": False} if args.layout_off else {})}
        for name, extra in (("combo", {"combo_kernels": True}), ("aggressive", {"aggressive_fusion": True})):
            if name in chosen:
                torch._dynamo.reset()
                label = f"static{', layout opt off' if args.layout_off else ''}+{name}"
                measure(label, torch.compile(unet, dynamic=False, options={**base, **extra}))
        if "engine" in chosen:  # the engine's options, static: the baseline for the variants below
            torch._dynamo.reset()
            measure("static, engine's options", torch.compile(unet, dynamic=False, options=UNET_COMPILE_OPTIONS))
        # The home step's options (combo kernels on top), and programmatic dependent launch: on Hopper a Triton
        # kernel may start while the one before it finishes. At 3 rows a step's ~650 kernels leave the GPU idle
        # ~1 ms between them inside the graph (7.96 ms busy of 8.92, results/NVIDIA_H100-x1-profile-idle.log).
        for name, options in (("home", STATIC_STEP_OPTIONS), ("pdl", {**UNET_COMPILE_OPTIONS, "triton.enable_pdl": True}),
                              ("homepdl", {**STATIC_STEP_OPTIONS, "triton.enable_pdl": True})):
            if name in chosen:
                torch._dynamo.reset()
                measure(f"static, {name}", torch.compile(unet, dynamic=False, options=options))
        # The attention kernel: cuDNN's is chosen by default on an H100; the UNet's heads are 40 wide at 64x64
        # latents (4096 tokens), which flash attention pads to 64. Static with the engine's options.
        for name, keep in (("flash", "flash"), ("efficient", "mem_efficient")):
            if name in chosen:
                toggles = ("cudnn", "flash", "mem_efficient")
                saved = {t: getattr(torch.backends.cuda, f"{t}_sdp_enabled")() for t in toggles}
                for t in toggles:
                    getattr(torch.backends.cuda, f"enable_{t}_sdp")(t == keep)
                torch._dynamo.reset()
                # The kernel is chosen when the graph is lowered, and the toggles are not part of inductor's
                # cache key: a cached graph would bring back the default's choice (stop 12's first try).
                with inductor.patch(fx_graph_cache=False):
                    measure(f"static, {name} attention",
                            torch.compile(unet, dynamic=False, options=UNET_COMPILE_OPTIONS))
                for t, on in saved.items():
                    getattr(torch.backends.cuda, f"enable_{t}_sdp")(on)
        if chosen & {"layout", "static", "nolayout", "symbolic", "forced"}:
            # Inductor keeps activations channels-last between convolutions ("layout optimization") only when
            # no convolution input has symbolic sizes (decide_layout_opt in torch/_inductor/graph.py;
            # pytorch#102670). The home step is static, every other shape symbolic (~17% slower at 3 rows),
            # and a 96-row call timed with a symbolic batch beat the static home step of the burst. So: the
            # home square, static with layout optimization (the engine's home step) and without, symbolic,
            # and symbolic with layout optimization forced; a static compile per row count (without layout
            # optimization only at the largest, the burst's question).
            base = {"triton.cudagraphs": True, "conv_1x1_as_mm": True}
            most = max(int(r) for r in args.rows.split(","))
            for key, label, dynamic, extra, only in (
                    ("static", "static", False, {}, None),
                    ("nolayout", "static, layout opt off", False, {"layout_optimization": False}, most),
                    ("symbolic", "symbolic", True, {}, None),
                    ("forced", "symbolic, layout opt forced", True, {"force_layout_optimization": True}, None)):
                if not chosen & {"layout", key}:
                    continue
                torch._dynamo.reset()
                measure(label, torch.compile(unet, dynamic=dynamic, options={**base, **extra}), only_rows=only)
        if "autotune" in chosen:  # Triton GEMM/conv templates benchmarked against cuBLAS/cuDNN per shape
            torch._dynamo.reset()
            measure("max-autotune+conv1x1mm", torch.compile(unet, mode="max-autotune"))
        if "fused_qkv" in chosen:
            unet.fuse_qkv_projections()
            torch._dynamo.reset()
            measure("graphs+conv1x1mm+qkv", torch.compile(unet, mode="reduce-overhead"))

if __name__ == "__main__":
    sys.exit(main())
