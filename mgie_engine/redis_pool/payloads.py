"""What crosses Redis, encoded as small JSON and validated on the way in: Redis is a trust boundary too.

Everything read back is type-checked and size-capped before it is used; a bad payload raises
:class:`BadPayloadError` (the caller fails that job with a clear message, it never crashes a loop).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
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
MAX_ERROR = 1000
MAX_PARAMS = 8  # a catalogue message has a few placeholders
MAX_PARAM_TEXT = 200
ERROR_KEY = re.compile(r"(engine|errors)\.[a-z0-9_]{1,64}\Z")  # the areas an engine error's message lives in
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}\Z")
CAUSE_WORD = re.compile(r"[a-z_]{1,32}\Z")
ENGINE_ERROR = "engine_error"  # bot/failure_causes' word for an error that names no cause of its own
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


# -- failures -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a job failed, as it crosses Redis: the English ``text`` (all that workers before this sent), and
    the message's catalogue ``key`` and ``params`` with the error's ``cause`` word, so the bot tells the user
    in their language and counts the failure by its real cause. Read back, each part is only shape-checked
    here (the bot checks the key against its catalogue and the cause against its words)."""

    text: str
    key: str | None = None
    params: dict[str, str | int | float] = dataclasses.field(default_factory=dict)
    cause: str | None = None

    def __str__(self) -> str:
        return self.text


def _param(value: Any) -> str | int | float | None:
    """A JSON-safe scalar param, or None for anything else (a bool, a float that is not finite, an object)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if abs(value) <= 2**53 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value
    return None


def failure_of(err: BaseException) -> Failure:
    """What a worker sends for an error that failed a job: its text, its key with the params that are
    scalars (strings cut to MAX_PARAM_TEXT, at most MAX_PARAMS), and its class's ``failure_cause``."""
    params: dict[str, str | int | float] = {}
    for name, value in (getattr(err, "params", None) or {}).items():
        value = _param(value)
        if value is not None and isinstance(name, str) and PARAM_NAME.match(name) and len(params) < MAX_PARAMS:
            params[name] = value[:MAX_PARAM_TEXT] if isinstance(value, str) else value
    key, cause = getattr(err, "key", None), getattr(err, "failure_cause", None)
    return Failure(str(err)[:MAX_ERROR], key if isinstance(key, str) and ERROR_KEY.match(key) else None, params,
                   cause if isinstance(cause, str) and CAUSE_WORD.match(cause) else ENGINE_ERROR)


def decode_failure(meta: dict) -> Failure | None:
    """A failed result's error. Its text must be well formed (else BadPayloadError); a malformed key,
    cause or params is dropped (each param on its own, all of them when there are too many), so the text
    still reaches the user."""
    error = meta.get("error")
    if error is None:
        return None
    text = _text(error, "error", MAX_ERROR)
    key, cause, raw_params = meta.get("error_key"), meta.get("cause"), meta.get("error_params")
    params: dict[str, str | int | float] = {}
    if isinstance(raw_params, dict) and len(raw_params) <= MAX_PARAMS:
        for name, value in raw_params.items():
            value = _param(value)
            if value is not None and PARAM_NAME.match(name) and not (isinstance(value, str)
                                                                     and len(value) > MAX_PARAM_TEXT):
                params[name] = value
    return Failure(text, key if isinstance(key, str) and ERROR_KEY.match(key) else None, params,
                   cause if isinstance(cause, str) and CAUSE_WORD.match(cause) else None)


# -- results ------------------------------------------------------------------------------------------
def encode_result(status: str, outcome: EditOutcome | None = None, error: str | Failure | None = None) -> bytes:
    """A result's JSON (UTF-8, not escaped: a failure's params in any language stay well under MAX_META_JSON)."""
    meta: dict[str, Any] = {"status": status}
    if outcome is not None:
        meta.update(expressive=outcome.expressive_instruction[:MAX_TEXT], width=outcome.width, height=outcome.height,
                    seconds=outcome.seconds, llm_cached=outcome.llm_cached, flagged=outcome.flagged,
                    timings={k: float(v) for k, v in list(outcome.timings.items())[:16]})
    if isinstance(error, Failure):
        meta["error"] = error.text[:MAX_ERROR]
        if error.key:
            meta["error_key"] = error.key
        if error.params:
            meta["error_params"] = error.params
        if error.cause:
            meta["cause"] = error.cause
    elif error is not None:
        meta["error"] = error[:MAX_ERROR]
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()


def decode_result(job: str, raw: Any, png: bytes | None) -> tuple[str, EditOutcome | None, str | None]:
    """(status, outcome for "done", error message otherwise)."""
    status, outcome, failure = decode_result_failure(job, raw, png)
    return status, outcome, failure.text if failure is not None else None


def decode_result_failure(job: str, raw: Any, png: bytes | None) -> tuple[str, EditOutcome | None, Failure | None]:
    """(status, outcome for "done", the :class:`Failure` otherwise)."""
    meta = _loads(raw, MAX_META_JSON, "result")
    status = meta.get("status")
    if status not in STATUSES:
        raise BadPayloadError("result: unknown status")
    if status != "done":
        return status, None, decode_failure(meta)
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
