"""What crosses Redis, encoded as small JSON and validated on the way in: Redis is a trust boundary too.

Everything read back is type-checked and size-capped before it is used; a bad payload raises
:class:`BadPayloadError` (the caller fails that job with a clear message, it never crashes a loop).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

from ..protocol import EditJob, EditOutcome, JobProgress, JobStage
from .keys import JOB_ID

MAX_INPUT_BYTES = 50 * 2**20  # an uploaded image; Discord's largest attachments are smaller
MAX_RESULT_BYTES = 200 * 2**20  # a PNG at MGIE_MAX_SIDE up to 4096 fits comfortably
MAX_JOB_JSON = 64 * 1024
MAX_META_JSON = 16 * 1024
MAX_PROGRESS_JSON = 512
MAX_PREVIEW_BYTES = 256 * 1024  # a 256 px JPEG is ~10-30 KB
MAX_PREVIEW_SIDE = 1024
PREVIEW_TTL = 30  # seconds a preview key lives: long enough for the bot to read it, short enough to forget it
MAX_HEARTBEAT_JSON = 4096
MAX_TEXT = 4000
MAX_HISTORY = 32
MAX_CAPACITY = 1024
STATUSES = ("done", "failed", "cancelled", "dead")
STAGES = ("language", "denoise", "decode")


class BadPayloadError(ValueError):
    """Something read from Redis is malformed or too large."""


def _loads(raw: Any, cap: int, what: str) -> dict:
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes | bytearray) or len(raw) > cap:
        raise BadPayloadError(f"{what}: missing or larger than {cap} bytes")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadPayloadError(f"{what}: not JSON") from None
    if not isinstance(value, dict):
        raise BadPayloadError(f"{what}: not an object")
    return value


def _text(value: Any, what: str, cap: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > cap:
        raise BadPayloadError(f"{what}: not a string of at most {cap} characters")
    return value


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadPayloadError(f"{what}: not a whole number in [{low}, {high}]")
    return value


def _float(value: Any, what: str, low: float = -1e9, high: float = 1e9) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise BadPayloadError(f"{what}: not a finite number")
    return float(value)


def job_id(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not JOB_ID.match(value):
        raise BadPayloadError("job id: malformed")
    return value


# -- jobs ---------------------------------------------------------------------------------------------
def encode_job(job: EditJob) -> bytes:
    """The stream entry's body: ids and options only; the image goes in its own key."""
    return json.dumps({"id": job.job_id, "instruction": job.instruction, "seed": job.seed,
                       "text_cfg": job.text_cfg, "image_cfg": job.image_cfg, "steps": job.steps,
                       "history": [list(turn) for turn in job.history], "previews": job.previews},
                      separators=(",", ":")).encode()


def decode_job(raw: Any, image: bytes) -> EditJob:
    data = _loads(raw, MAX_JOB_JSON, "job")
    history = data.get("history", [])
    if not isinstance(history, list) or len(history) > MAX_HISTORY:
        raise BadPayloadError("job history: not a short list")
    turns = []
    for turn in history:
        if not isinstance(turn, list) or len(turn) != 2:
            raise BadPayloadError("job history: malformed turn")
        turns.append((_text(turn[0], "history"), _text(turn[1], "history")))
    return EditJob(job_id=job_id(data.get("id")), image=image, instruction=_text(data.get("instruction"), "instruction"),
                   seed=_int(data.get("seed"), "seed", 0, 2**63 - 1), text_cfg=_float(data.get("text_cfg"), "text_cfg"),
                   image_cfg=_float(data.get("image_cfg"), "image_cfg"),
                   steps=_int(data.get("steps"), "steps", 1, 10_000), history=tuple(turns),
                   previews=data.get("previews") is True)


# -- results ------------------------------------------------------------------------------------------
def encode_result(status: str, outcome: EditOutcome | None = None, error: str | None = None) -> bytes:
    meta: dict[str, Any] = {"status": status}
    if outcome is not None:
        meta.update(expressive=outcome.expressive_instruction[:MAX_TEXT], width=outcome.width, height=outcome.height,
                    seconds=outcome.seconds, llm_cached=outcome.llm_cached, flagged=outcome.flagged,
                    timings={k: float(v) for k, v in list(outcome.timings.items())[:16]})
    if error is not None:
        meta["error"] = error[:1000]
    return json.dumps(meta, separators=(",", ":")).encode()


def decode_result(job: str, raw: Any, png: bytes | None) -> tuple[str, EditOutcome | None, str | None]:
    """(status, outcome for "done", error message otherwise)."""
    meta = _loads(raw, MAX_META_JSON, "result")
    status = meta.get("status")
    if status not in STATUSES:
        raise BadPayloadError("result: unknown status")
    if status != "done":
        error = meta.get("error")
        return status, None, _text(error, "error", 1000) if error is not None else None
    if not png or len(png) > MAX_RESULT_BYTES:
        raise BadPayloadError("result: image missing or too large")
    timings = meta.get("timings", {})
    if not isinstance(timings, dict) or len(timings) > 16:
        raise BadPayloadError("result: timings malformed")
    outcome = EditOutcome(
        job_id=job, png=png, expressive_instruction=_text(meta.get("expressive", ""), "expressive"),
        width=_int(meta.get("width"), "width", 1, 65_536), height=_int(meta.get("height"), "height", 1, 65_536),
        seconds=_float(meta.get("seconds"), "seconds", 0.0), timings={_text(k, "timing", 64): _float(v, "timing")
                                                                        for k, v in timings.items()},
        llm_cached=bool(meta.get("llm_cached")), flagged=bool(meta.get("flagged")))
    return status, outcome, None


# -- progress -----------------------------------------------------------------------------------------
def encode_progress(progress: JobProgress) -> bytes:
    """A progress tick; a preview's bytes never go in it (they are in ``Keys.preview``), only ``"p": 1``."""
    data = {"j": progress.job_id, "s": str(progress.stage), "n": progress.step, "t": progress.total}
    if progress.preview:
        data["p"] = 1
    return json.dumps(data, separators=(",", ":")).encode()


def decode_progress_message(raw: Any) -> tuple[JobProgress, bool]:
    """A progress tick, and whether a new preview waits in the job's preview key."""
    data = _loads(raw, MAX_PROGRESS_JSON, "progress")
    stage = data.get("s")
    if stage not in STAGES:
        raise BadPayloadError("progress: unknown stage")
    total = _int(data.get("t"), "total", 1, 100_000)
    progress = JobProgress(job_id(data.get("j")), JobStage(stage), _int(data.get("n"), "step", 0, total), total)
    return progress, data.get("p") == 1


def decode_progress(raw: Any) -> JobProgress:
    return decode_progress_message(raw)[0]


def check_preview(raw: Any) -> bytes:
    """A preview read from Redis: bytes, at most MAX_PREVIEW_BYTES, a JPEG, PNG or WEBP whose header says at
    most MAX_PREVIEW_SIDE pixels a side (the bot uploads it to Discord as it is)."""
    import PIL.Image

    if not isinstance(raw, bytes | bytearray) or not raw or len(raw) > MAX_PREVIEW_BYTES:
        raise BadPayloadError(f"preview: missing or larger than {MAX_PREVIEW_BYTES} bytes")
    try:
        with PIL.Image.open(io.BytesIO(raw), formats=("JPEG", "PNG", "WEBP")) as image:
            width, height = image.size
    except Exception:
        raise BadPayloadError("preview: not a JPEG, PNG or WEBP image") from None
    if not (0 < width <= MAX_PREVIEW_SIDE and 0 < height <= MAX_PREVIEW_SIDE):
        raise BadPayloadError("preview: too large")
    return bytes(raw)


# -- heartbeats ---------------------------------------------------------------------------------------
def encode_heartbeat(**fields: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def decode_heartbeat(raw: Any) -> dict[str, Any]:
    """A worker's heartbeat: capacity (jobs at once), active jobs, state; for capacity and /mgie status."""
    data = _loads(raw, MAX_HEARTBEAT_JSON, "heartbeat")
    state = data.get("state")
    if state not in ("loading", "ready", "failed", "stopping"):
        raise BadPayloadError("heartbeat: unknown state")
    return {"name": _text(data.get("name"), "name", 128), "state": state,
            "capacity": _int(data.get("capacity"), "capacity", 0, MAX_CAPACITY),
            "active": _int(data.get("active"), "active", 0, MAX_CAPACITY),
            "device": _text(data.get("device", "?"), "device", 64),
            "random_weights": bool(data.get("random_weights")),
            "error": _text(data["error"], "error", 500) if data.get("error") is not None else None,
            # serving_modes: "eager (compiling)", "compiled", ...; dynamo compiles while serving
            "mode": _text(data["mode"], "mode", 40) if data.get("mode") is not None else None,
            "compiles": _int(data.get("compiles", 0), "compiles", 0, 10**9)}
