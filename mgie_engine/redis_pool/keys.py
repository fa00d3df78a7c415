"""Every key, stream and channel of one pool, under its prefix (two bots can share one Redis)."""

from __future__ import annotations

import dataclasses
import re

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CONSUMER = re.compile(r"^[A-Za-z0-9_.:@+-]{1,128}$")
WORKERS_GROUP = "workers"
BOTS_GROUP = "bots"


@dataclasses.dataclass(frozen=True)
class Keys:
    prefix: str = "mgie"

    @property
    def jobs(self) -> str:
        """The job stream (entries: ids and options only); its consumer group is WORKERS_GROUP."""
        return f"{self.prefix}:jobs"

    @property
    def results(self) -> str:
        """Job ids that have a result; the bot's consumer group BOTS_GROUP reads it."""
        return f"{self.prefix}:results"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def progress(self) -> str:
        """Pub/Sub channel for small progress ticks (never image bytes)."""
        return f"{self.prefix}:progress"

    def input(self, job_id: str) -> str:
        return f"{self.prefix}:in:{job_id}"

    def ref(self, job_id: str) -> str:
        """The id of the job's entry in the job stream, while it has one."""
        return f"{self.prefix}:ref:{job_id}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:res:{job_id}"

    def result_png(self, job_id: str) -> str:
        return f"{self.prefix}:png:{job_id}"

    def preview(self, job_id: str) -> str:
        """The job's latest live preview (a small JPEG, short TTL); progress messages carry only a flag."""
        return f"{self.prefix}:preview:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def worker(self, consumer: str) -> str:
        return f"{self.prefix}:worker:{consumer}"

    @property
    def workers(self) -> str:
        """A set of the workers' names (their heartbeat keys expire; the bot drops names whose key is gone)."""
        return f"{self.prefix}:workers"
