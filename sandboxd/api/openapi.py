"""The OpenAPI 3.1 description of every route (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

from sandboxd.job import STATUSES
from sandboxd.jobs import STATES
from sandboxd.judge.judging import VERDICTS
from sandboxd.store.submissions import SUBMISSION_STATES
from sandboxd.limits import LIMIT_FIELDS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json_body(_ref("Error"), "Invalid JSON"),
    "401": _json_body(_ref("Error"), "Missing or unknown API key"),
    "413": _json_body(_ref("Error"), "Body over 16 MiB"),
    "422": _json_body(_ref("Error"), "A field is invalid; details.field names it"),
}
_QUOTA = {
    "429": _json_body(_ref("Error"), "A tenant quota (queued jobs, CPU seconds per day); see Retry-After"),
    "503": _json_body(_ref("Error"), "The queue is full or the service is shutting down; see Retry-After"),
}
_NOT_FOUND = {"404": _json_body(_ref("Error"), "No such job for this tenant")}


def _param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = False) -> dict:
    return {"name": name, "in": where, "schema": schema, "description": description, "required": required}


_JOB_ID = _param("job_id", "path", {"type": "string"}, "Job id", required=True)
_SIZE = {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "examples": ["256m"]}]}
_SECONDS = {"oneOf": [{"type": "number", "minimum": 0}, {"type": "string"}]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message", "details"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}}}},
    },
    "Content": {"oneOf": [{"type": "string"}, {"type": "object", "required": ["base64"],
                                                  "properties": {"base64": {"type": "string"}}}]},
    "JobRequest": {
        "type": "object",
        "required": ["cmd"],
        "additionalProperties": False,
        "properties": {
            "cmd": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "image": {"type": "string", "default": "host"},
            "stdin": _ref("Content"),
            "files": {"type": "object", "additionalProperties": _ref("Content"),
                      "description": "Relative path under /work -> content"},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "limits": {"type": "object", "additionalProperties": False, "properties": {
                name: (_SIZE if field.endswith(("_bytes", "_per_s")) else _SECONDS if field.endswith("_s") or name == "cpus"
                       else {"type": "integer"}) for name, field in LIMIT_FIELDS.items()}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Result": {
        "type": "object",
        "description": "Exactly the fields of `sandboxd run --json`",
        "properties": {
            "status": {"enum": list(STATUSES)}, "exit_code": {"type": ["integer", "null"]},
            "signal": {"type": ["integer", "null"]}, "cpu_time_ms": {"type": "number"},
            "cpu_user_ms": {"type": "number"}, "cpu_sys_ms": {"type": "number"}, "wall_time_ms": {"type": "number"},
            "memory_peak_bytes": {"type": "integer"}, "pids_peak": {"type": "integer"},
            "oom_killed": {"type": "boolean"}, "limit_hit": {"type": ["string", "null"]},
            "stdout": {"type": "string"}, "stderr": {"type": "string"}, "stdout_truncated": {"type": "boolean"},
            "stderr_truncated": {"type": "boolean"}, "accounting_source": {"type": "object"},
            "message": {"type": ["string", "null"]},
        },
    },
    "Job": {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "tenant": {"type": "string"}, "state": {"enum": list(STATES)},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": ["string", "null"], "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
            "image": {"type": "string"}, "cmd": {"type": "array", "items": {"type": "string"}},
            "limits": {"type": "object", "description": "The effective limits, in seconds, bytes and counts"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "result": {"oneOf": [_ref("Result"), {"type": "null"}]},
        },
    },
    "SubmissionRequest": {
        "type": "object",
        "required": ["language", "source", "tests"],
        "additionalProperties": False,
        "properties": {
            "language": {"type": "string", "description": "A language id of GET /v1/languages"},
            "source": {**_ref("Content"), "description": "Non-empty; with files, at most 1 MiB together"},
            "files": {"type": "object", "additionalProperties": _ref("Content"),
                      "description": "Other files beside the source, by path under the work directory; "
                                     "without source, the language's source file (main.c, ...) is the source"},
            "tests": {"type": "array", "minItems": 1, "maxItems": 100, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "name": {"type": "string", "description": "Default: its position, from 1"},
                    "stdin": _ref("Content"),
                    "expected_output": {**_ref("Content"), "description": "None: any output is accepted"},
                    "limits": {"type": "object", "description": "This test's run limits (as a job's)"}}},
                "description": "Inputs and expected outputs at most 16 MiB together"},
            "checker": {"oneOf": [{"enum": ["exact", "lines", "tokens", "float"]}, {"type": "object", "properties": {
                "type": {"enum": ["exact", "lines", "tokens", "float", "program"]},
                "absolute_tolerance": {"type": "number"}, "relative_tolerance": {"type": "number"},
                "language": {"type": "string"}, "source": {"type": "string"}}}], "default": "lines"},
            "interactor": {"type": "object", "required": ["language", "source"], "additionalProperties": False,
                           "properties": {"language": {"type": "string"}, "source": {"type": "string"}},
                           "description": "An interactive problem's: connected to the solution's stdin and stdout "
                                          "by pipes, given files input and expected_output; its exit decides "
                                          "(0 accepts, 1 rejects). Not with a checker"},
            "limits": {"type": "object", "description": "Run limits of every test (as a job's)"},
            "stop_on_first_failure": {"type": "boolean", "default": False},
            "labels": {"type": "object", "additionalProperties": {"type": "string"},
                       "description": "Copied to every job; 'submission' and 'role' are the service's"},
        },
    },
    "Submission": {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "tenant": {"type": "string"},
            "state": {"enum": list(SUBMISSION_STATES)}, "language": {"type": "string"},
            "verdict": {"oneOf": [{"enum": [v for v in VERDICTS if v != "skipped"]}, {"type": "null"}]},
            "created_at": {"type": "string", "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
            "message": {"type": ["string", "null"]},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "compile": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
                "status": {"enum": list(STATUSES)}, "exit_code": {"type": ["integer", "null"]},
                "output": {"type": "string", "description": "The start of the compiler's diagnostics"},
                "cpu_time_ms": {"type": "number"}, "wall_time_ms": {"type": "number"},
                "memory_peak_bytes": {"type": "integer"}}}]},
            "tests": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "verdict": {"enum": list(VERDICTS)}, "message": {"type": ["string", "null"]},
                "status": {"type": ["string", "null"]}, "exit_code": {"type": ["integer", "null"]},
                "signal": {"type": ["integer", "null"]}, "cpu_time_ms": {"type": ["number", "null"]},
                "wall_time_ms": {"type": ["number", "null"]}, "memory_peak_bytes": {"type": ["integer", "null"]},
                "stdout_excerpt": {"type": ["string", "null"]}, "stderr_excerpt": {"type": ["string", "null"]}}}},
        },
    },
    "Language": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "version": {"type": ["string", "null"]},
        "status": {"enum": ["probing", "available", "unavailable"]}, "available": {"type": "boolean"},
        "reason": {"type": ["string", "null"]}, "judge0_id": {"type": "integer"},
        "piston": {"type": "array", "items": {"type": "string"}}}},
    "Usage": {"type": "object", "properties": {
        "from": {"type": ["string", "null"]}, "to": {"type": ["string", "null"]},
        "group_by": {"type": ["string", "null"]},
        "rows": {"type": "array", "items": {"type": "object"}}, "totals": {"type": "object"}}},
}


def _operation(summary: str, responses: dict[str, Any], *, parameters: list | None = None,
               body: dict[str, Any] | None = None, public: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if public:
        operation["security"] = []
    return operation


def openapi_document() -> dict[str, Any]:
    job = _json_body(_ref("Job"), "The job")
    paths = {
        "/healthz": {"get": _operation("Liveness, queue depth and running jobs (no key needed)",
                                       {"200": _json_body({"type": "object"}, "Serving"),
                                        "503": _json_body({"type": "object"}, "Draining")}, public=True)},
        "/v1/jobs": {
            "post": _operation("Submit a job", {"201": job, **_ERRORS, **_QUOTA}, body=_ref("JobRequest"), parameters=[
                _param("wait", "query", {"type": "boolean"}, "Answer when the job is done (or at the timeout)"),
                _param("timeout", "query", {"type": "number", "maximum": 300}, "Seconds to wait (default 60)")]),
            "get": _operation("List jobs, newest first", {"200": _json_body({"type": "object", "properties": {
                "jobs": {"type": "array", "items": _ref("Job")}, "next_cursor": {"type": ["string", "null"]}}},
                "A page of jobs"), **_ERRORS}, parameters=[
                _param("state", "query", {"enum": list(STATES)}, "Only jobs in this state"),
                _param("label", "query", {"type": "string"}, "NAME=VALUE"),
                _param("limit", "query", {"type": "integer", "maximum": 500}, "Page size (default 50)"),
                _param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
                _param("tenant", "query", {"type": "string"}, "Admins: one tenant's jobs")]),
        },
        "/v1/jobs/batch": {"post": _operation(
            "Submit up to 100 jobs at once (all or none)",
            {"201": _json_body({"type": "object", "properties": {"jobs": {"type": "array", "items": _ref("Job")}}},
                               "The jobs"), **_ERRORS, **_QUOTA},
            body={"type": "object", "required": ["jobs"], "properties": {
                "jobs": {"type": "array", "items": _ref("JobRequest"), "maxItems": 100}}})},
        "/v1/jobs/{job_id}": {
            "get": _operation("One job", {"200": job, **_NOT_FOUND}, parameters=[_JOB_ID]),
            "delete": _operation("Cancel a queued or running job (accounting is kept)",
                                 {"200": job, **_NOT_FOUND, "409": _json_body(_ref("Error"), "Already finished")},
                                 parameters=[_JOB_ID]),
        },
        "/v1/usage": {"get": _operation("Usage per tenant: jobs, CPU, wall and memory GiB-seconds, by status", {
            "200": {"description": "The report", "content": {"application/json": {"schema": _ref("Usage")},
                                                             "text/csv": {"schema": {"type": "string"}}}},
            **_ERRORS}, parameters=[
            _param("from", "query", {"type": "string"}, "Start (ISO 8601, UTC unless a zone is given), inclusive"),
            _param("to", "query", {"type": "string"}, "End, exclusive"),
            _param("group_by", "query", {"type": "string"}, "day, hour, image, status or label:NAME"),
            _param("format", "query", {"enum": ["json", "csv"]}, "Or Accept: text/csv"),
            _param("tenant", "query", {"type": "string"}, "Admins: one tenant")])},
        "/v1/submissions": {"post": _operation(
            "Judge a submission: compile once, run every test as jobs of the tenant (labelled "
            "submission=ID, role=compile|test N|checker ...|interactor ...), check each output",
            {"201": _json_body(_ref("Submission"), "Accepted (not finished yet)"),
             "200": _json_body(_ref("Submission"), "Finished, with wait"), **_ERRORS, **_QUOTA},
            body=_ref("SubmissionRequest"), parameters=[
                _param("wait", "query", {"type": "boolean"}, "Answer when it is judged (or at the timeout)"),
                _param("timeout", "query", {"type": "number", "maximum": 300}, "Seconds to wait (default 60)")])},
        "/v1/submissions/{submission_id}": {"get": _operation(
            "One submission", {"200": _json_body(_ref("Submission"), "The submission"),
                               "404": _json_body(_ref("Error"), "No such submission for this tenant")},
            parameters=[_param("submission_id", "path", {"type": "string"}, "Submission id", required=True)])},
        "/v1/languages": {"get": _operation(
            "The languages submissions may use, and whether this machine runs them",
            {"200": _json_body({"type": "object", "properties": {"languages": {"type": "array", "items": _ref("Language")}}},
                               "The catalogue"), **_ERRORS}, parameters=[
                _param("wait", "query", {"type": "boolean"}, "Answer when every language is probed (or at the timeout)"),
                _param("timeout", "query", {"type": "number", "maximum": 300}, "Seconds to wait (default 60)")])},
        "/v1/images": {"get": _operation("Images jobs can run over", {"200": _json_body({"type": "object"}, "Images")})},
        "/metrics": {"get": _operation("Prometheus metrics (admin key)", {
            "200": {"description": "Text exposition format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}},
            "403": _json_body(_ref("Error"), "Not an admin")})},
        "/openapi.json": {"get": _operation("This document", {"200": _json_body({"type": "object"}, "OpenAPI 3.1")})},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sandboxd", "version": "1", "description": (
            "Run untrusted code in sandboxes; account per tenant. Judge0's API (1.13.1) is also served "
            "under /judge0/ and Piston's (v2) under /piston/, as their projects document them.")},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
