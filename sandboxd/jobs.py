"""A job as the service knows it: what a tenant asked for, where it is in its life, and what
it came to. The runtime's contract (JobSpec, Result) is in sandboxd.job; this wraps it with
tenancy, lifecycle and the stored form that lets a queued job survive a restart."""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from sandboxd.job import InputFile, JobSpec, Result, StdioPipe
from sandboxd.limits import LIMIT_FIELDS, Limits

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"
STATES = (QUEUED, RUNNING, DONE, CANCELLED)
FINAL_STATES = (DONE, CANCELLED)


def limits_to_public(limits: Limits) -> dict[str, Any]:
    """Limits by their public names, in seconds, bytes and counts."""
    return {name: getattr(limits, field) for name, field in LIMIT_FIELDS.items()}


def limits_from_public(data: dict[str, Any]) -> Limits:
    return Limits(**{field: data[name] for name, field in LIMIT_FIELDS.items()})


@dataclass(frozen=True)
class JobRequest:
    """A validated submission: everything needed to run the job, nothing unchecked."""

    argv: tuple[str, ...]
    image: str
    limits: Limits
    stdin: bytes | None = None
    files: tuple[InputFile, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    # Judging only: side 1 rides with the side 0 submitted just before it (scheduler.py).
    stdio_pipe: StdioPipe | None = None

    def spec(self, job_id: str) -> JobSpec:
        return JobSpec(argv=self.argv, limits=self.limits, image=self.image, env=self.env,
                       stdin=self.stdin, files=self.files, job_id=job_id, stdio_pipe=self.stdio_pipe)

    def inputs_json(self) -> str:
        """What a queued job needs beyond its jobs row, to run after a restart."""
        return json.dumps({
            "stdin": None if self.stdin is None else base64.b64encode(self.stdin).decode(),
            "files": [[f.path, base64.b64encode(f.content).decode(), f.mode] for f in self.files],
            "env": [list(pair) for pair in self.env],
            "stdio_pipe": None if self.stdio_pipe is None else [self.stdio_pipe.group, self.stdio_pipe.side],
        })

    @classmethod
    def from_stored(cls, *, cmd: str, image: str, limits: str, labels: str, inputs: str) -> JobRequest:
        stored = json.loads(inputs)
        return cls(
            argv=tuple(json.loads(cmd)),
            image=image,
            limits=limits_from_public(json.loads(limits)),
            stdin=None if stored["stdin"] is None else base64.b64decode(stored["stdin"]),
            files=tuple(InputFile(path, base64.b64decode(content), mode) for path, content, mode in stored["files"]),
            env=tuple((key, value) for key, value in stored["env"]),
            labels=tuple(sorted(json.loads(labels).items())),
            stdio_pipe=StdioPipe(*stored["stdio_pipe"]) if stored.get("stdio_pipe") else None,
        )


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    state: str
    created_at: str
    image: str
    argv: tuple[str, ...]
    limits: Limits
    labels: tuple[tuple[str, str], ...]
    started_at: str | None = None
    finished_at: str | None = None
    result: Result | None = None

    def replace(self, **changes: Any) -> JobRecord:
        return dataclasses.replace(self, **changes)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES
