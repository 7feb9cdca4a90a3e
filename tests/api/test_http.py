"""The HTTP API contract, on the real service (loopback port, real SQLite file, real jobs)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import pytest

from servicekit import Service, add_tenant, service_leftovers
from sandboxd.api.http import MAX_BODY_BYTES, ServiceContext, create_app
from sandboxd.job import Result

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
RESULT_FIELDS = set(Result.__dataclass_fields__)  # `sandboxd run --json` without --base64
GiB = 1 << 30


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("api-state")
    keys = {
        "alice": add_tenant(state_dir, "alice"),
        "bob": add_tenant(state_dir, "bob"),
        "carol": add_tenant(state_dir, "carol"),
        "root": add_tenant(state_dir, "root", "--admin"),
    }
    service = Service(state_dir, "--warm", "1").start()
    service.keys = keys
    yield service
    assert service.stop() == 0, service.log()
    assert service_leftovers(state_dir) == []


def test_healthz_needs_no_key_and_reports_the_queue(api):
    reply = api.request("GET", "/healthz")
    assert reply.status == 200
    assert reply.json()["status"] == "ok" and {"queued", "running", "workers"} <= set(reply.json())


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer sbx_not-a-key"])
def test_requests_without_a_valid_key_are_401(api, header):
    reply = api.request("GET", "/v1/jobs", headers={"Authorization": header} if header else None)
    assert reply.status == 401
    assert reply.error_code == "unauthorized"
    assert set(reply.json()["error"]) == {"code", "message", "details"}


def test_a_job_runs_and_answers_with_the_run_json_fields(api):
    job = api.run(api.keys["alice"], {"cmd": ["python3", "-c", "print(6 * 7)"], "labels": {"suite": "basic"}})
    assert job["state"] == "done" and job["tenant"] == "alice" and job["image"] == "host"
    assert set(job["result"]) == RESULT_FIELDS
    assert job["result"]["status"] == "ok" and job["result"]["stdout"] == "42\n"
    assert job["result"]["cpu_time_ms"] > 0 and job["result"]["memory_peak_bytes"] > 0
    for field in ("created_at", "started_at", "finished_at"):
        assert ISO_UTC.match(job[field]), job[field]
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["limits"]["memory"] == 256 << 20 and job["limits"]["cpu_time"] == 10
    assert job["labels"] == {"suite": "basic"}
    again = api.request("GET", f"/v1/jobs/{job['id']}", api.keys["alice"])
    assert again.status == 200 and again.json() == job


def test_files_stdin_env_and_limits_reach_the_job(api):
    payload = bytes(range(256))
    job = api.run(api.keys["alice"], {
        "cmd": ["sh", "-c", "cat src/a.txt; cat; echo \" $GREETING\"; sha256sum bin.dat | cut -c1-16; ulimit -n"],
        "files": {"src/a.txt": "from a file\n", "bin.dat": {"base64": base64.b64encode(payload).decode()}},
        "stdin": "from stdin",
        "env": {"GREETING": "hello"},
        "limits": {"open_files": 100, "memory": "128m", "wall_time": 20},
    })
    expected = f"from a file\nfrom stdin hello\n{hashlib.sha256(payload).hexdigest()[:16]}\n100\n"
    assert job["result"]["stdout"] == expected, job["result"]
    assert job["limits"]["memory"] == 128 << 20 and job["limits"]["open_files"] == 100


def test_a_job_without_wait_is_accepted_at_once_and_cancel_keeps_its_accounting(api):
    reply = api.request("POST", "/v1/jobs", api.keys["alice"], {"cmd": ["sleep", "30"]})
    assert reply.status == 201
    job = reply.json()
    assert job["state"] in ("queued", "running") and job["result"] is None
    cancelled = api.request("DELETE", f"/v1/jobs/{job['id']}", api.keys["alice"])
    assert cancelled.status == 200
    body = cancelled.json()
    assert body["state"] == "cancelled" and body["finished_at"]
    assert body["result"] is None or body["result"]["wall_time_ms"] < 30_000
    again = api.request("DELETE", f"/v1/jobs/{job['id']}", api.keys["alice"])
    assert again.status == 409 and again.error_code == "job_finished"
    assert api.request("GET", f"/v1/jobs/{job['id']}", api.keys["alice"]).json()["state"] == "cancelled"


def test_another_tenants_job_is_404_for_reads_and_cancels_but_visible_to_an_admin(api):
    job = api.run(api.keys["alice"], {"cmd": ["true"]})
    for method in ("GET", "DELETE"):
        reply = api.request(method, f"/v1/jobs/{job['id']}", api.keys["bob"])
        assert reply.status == 404 and reply.error_code == "job_not_found"
    assert api.request("GET", f"/v1/jobs/{job['id']}", api.keys["root"]).json()["id"] == job["id"]
    listed = api.request("GET", "/v1/jobs?limit=500", api.keys["bob"]).json()["jobs"]
    assert all(entry["tenant"] == "bob" for entry in listed)
    assert api.request("GET", "/v1/jobs?tenant=alice", api.keys["bob"]).status == 403
    as_admin = api.request("GET", "/v1/jobs?tenant=alice&limit=500", api.keys["root"]).json()["jobs"]
    assert job["id"] in {entry["id"] for entry in as_admin}


def test_unknown_job_ids_are_404(api):
    for job_id in ("0" * 32, "not-an-id", "..%2F..%2Fetc"):
        assert api.request("GET", f"/v1/jobs/{job_id}", api.keys["alice"]).status == 404


def test_batch_accepts_all_jobs_and_listing_pages_newest_first(api):
    jobs = [{"cmd": ["echo", str(n)], "labels": {"batch": "pages"}} for n in range(5)]
    reply = api.request("POST", "/v1/jobs/batch", api.keys["bob"], {"jobs": jobs})
    assert reply.status == 201
    created = [job["id"] for job in reply.json()["jobs"]]
    assert len(created) == 5
    seen, cursor = [], None
    while True:
        query = "/v1/jobs?label=batch=pages&limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = api.request("GET", query, api.keys["bob"]).json()
        assert len(page["jobs"]) <= 2
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))


def test_a_batch_with_one_bad_job_stores_nothing(api):
    jobs = [{"cmd": ["true"], "labels": {"batch": "refused"}}, {"cmd": "true", "labels": {"batch": "refused"}}]
    reply = api.request("POST", "/v1/jobs/batch", api.keys["bob"], {"jobs": jobs})
    assert reply.status == 422
    assert reply.json()["error"]["details"]["field"] == "jobs[1].cmd"
    assert api.request("GET", "/v1/jobs?label=batch=refused", api.keys["bob"]).json()["jobs"] == []
    too_many = api.request("POST", "/v1/jobs/batch", api.keys["bob"], {"jobs": [{"cmd": ["true"]}] * 101})
    assert too_many.status == 422 and too_many.json()["error"]["details"]["field"] == "jobs"


@pytest.mark.parametrize("body, field", [
    ({}, "cmd"),
    ({"cmd": []}, "cmd"),
    ({"cmd": "echo hi"}, "cmd"),
    ({"cmd": ["echo", 1]}, "cmd[1]"),
    ({"cmd": ["echo"], "colour": "red"}, "colour"),
    ({"cmd": ["echo"], "image": "nope"}, "image"),
    ({"cmd": ["echo"], "image": "../etc"}, "image"),
    ({"cmd": ["echo"], "limits": {"memory": "16t"}}, "limits.memory"),
    ({"cmd": ["echo"], "limits": {"memory": "lots"}}, "limits.memory"),
    ({"cmd": ["echo"], "limits": {"cpu_time": -1}}, "limits.cpu_time"),
    ({"cmd": ["echo"], "limits": {"cpu_time": True}}, "limits.cpu_time"),
    ({"cmd": ["echo"], "limits": {"pids": 10 ** 9}}, "limits.pids"),
    ({"cmd": ["echo"], "limits": {"gpus": 1}}, "limits.gpus"),
    ({"cmd": ["echo"], "files": {"/etc/passwd": "x"}}, "files['/etc/passwd']"),
    ({"cmd": ["echo"], "files": {"a/../../x": "x"}}, "files['a/../../x']"),
    ({"cmd": ["echo"], "files": {"a\u0000b": "x"}}, "files['a\\x00b']"),
    ({"cmd": ["echo"], "files": {"a": {"base64": "!!"}}}, "files['a']"),
    ({"cmd": ["echo"], "env": {"BAD-NAME": "x"}}, "env['BAD-NAME']"),
    ({"cmd": ["echo"], "labels": {"k": 5}}, "labels['k']"),
    ({"cmd": ["echo"], "stdin": 5}, "stdin"),
])
def test_invalid_jobs_are_422_naming_the_field_and_nothing_is_stored(api, body, field):
    before = api.request("GET", "/v1/jobs?limit=500", api.keys["carol"]).json()["jobs"]
    reply = api.request("POST", "/v1/jobs", api.keys["carol"], body)
    assert reply.status == 422, reply.body
    assert reply.json()["error"]["details"]["field"] == field
    assert reply.json()["error"]["message"]
    assert api.request("GET", "/v1/jobs?limit=500", api.keys["carol"]).json()["jobs"] == before


@pytest.mark.parametrize("raw, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (b"[1, 2]", 422, "invalid_request"),
    (b"null", 422, "invalid_request"),
])
def test_malformed_bodies_get_clear_errors(api, raw, status, code):
    reply = api.request("POST", "/v1/jobs", api.keys["carol"], raw=raw)
    assert (reply.status, reply.error_code) == (status, code)


def test_an_oversized_body_is_413(api):
    body = json.dumps({"cmd": ["true"], "stdin": "x" * (MAX_BODY_BYTES + 1)}).encode()
    reply = api.request("POST", "/v1/jobs", api.keys["carol"], raw=body)
    assert reply.status == 413 and reply.error_code == "body_too_large"


def test_bad_query_parameters_are_422(api):
    key = api.keys["carol"]
    assert api.request("POST", "/v1/jobs?wait=maybe", key, {"cmd": ["true"]}).status == 422
    assert api.request("POST", "/v1/jobs?wait=true&timeout=9999", key, {"cmd": ["true"]}).status == 422
    assert api.request("GET", "/v1/jobs?limit=0", key).status == 422
    assert api.request("GET", "/v1/jobs?cursor=abc", key).status == 422
    assert api.request("GET", "/v1/jobs?state=sleeping", key).status == 422
    assert api.request("GET", "/v1/jobs?colour=red", key).status == 422
    for query, field in (("group_by=weather", "group_by"), ("from=yesterday", "from"), ("to=noon", "to")):
        reply = api.request("GET", f"/v1/usage?{query}", key)
        assert reply.status == 422 and reply.json()["error"]["details"]["field"] == field


def test_unknown_routes_and_methods_are_json_errors(api):
    missing = api.request("GET", "/v1/nothing", api.keys["carol"])
    assert missing.status == 404 and missing.error_code == "not_found"
    wrong = api.request("PUT", "/v1/jobs", api.keys["carol"], {"cmd": ["true"]})
    assert wrong.status == 405 and wrong.error_code == "method_not_allowed"


def test_usage_adds_up_to_the_per_job_figures(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("usage-state")
    key = add_tenant(state_dir, "dave")
    other = add_tenant(state_dir, "erin")
    service = Service(state_dir, "--warm", "0").start()
    try:
        jobs = [service.run(key, {"cmd": ["python3", "-c", "sum(range(10**6))"], "labels": {"kind": "sum"}}),
                service.run(key, {"cmd": ["sh", "-c", "exit 3"], "labels": {"kind": "fail"}}),
                service.run(key, {"cmd": ["true"]})]
        service.run(other, {"cmd": ["true"]})
        report = service.request("GET", "/v1/usage", key).json()
        assert [row["tenant"] for row in report["rows"]] == ["dave"]
        totals = report["totals"]
        results = [job["result"] for job in jobs]
        assert totals["jobs"] == 3
        assert totals["cpu_seconds"] == pytest.approx(sum(r["cpu_time_ms"] for r in results) / 1000, abs=1e-5)
        assert totals["wall_seconds"] == pytest.approx(sum(r["wall_time_ms"] for r in results) / 1000, abs=1e-5)
        assert totals["memory_gb_seconds"] == pytest.approx(
            sum(r["memory_peak_bytes"] / GiB * r["wall_time_ms"] / 1000 for r in results), abs=1e-5)
        assert totals["by_status"] == {"ok": 2, "runtime_error": 1}
        by_label = service.request("GET", "/v1/usage?group_by=label:kind", key).json()["rows"]
        assert {row["group"]: row["jobs"] for row in by_label} == {None: 1, "fail": 1, "sum": 1}
        as_csv = service.request("GET", "/v1/usage", key, headers={"Accept": "text/csv"})
        assert as_csv.headers["Content-Type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(as_csv.body.decode())))
        assert rows[0]["tenant"] == "dave" and int(rows[0]["jobs"]) == 3
        assert service.request("GET", "/v1/usage?format=csv", key).body == as_csv.body
        assert service.request("GET", "/v1/usage?tenant=erin", key).status == 403
    finally:
        assert service.stop() == 0
    assert service_leftovers(state_dir) == []


def test_metrics_need_an_admin_and_count_jobs_requests_and_the_queue(api):
    api.run(api.keys["alice"], {"cmd": ["true"]})
    assert api.request("GET", "/metrics", api.keys["alice"]).status == 403
    reply = api.request("GET", "/metrics", api.keys["root"])
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    text = reply.body.decode()
    assert re.search(r'^sandboxd_jobs_finished_total\{status="ok"\} [1-9]', text, re.M)
    assert re.search(r"^sandboxd_queue_depth \d+$", text, re.M)
    assert re.search(r"^sandboxd_jobs_running \d+$", text, re.M)
    assert re.search(r'^sandboxd_job_duration_seconds_bucket\{le="\+Inf"\} [1-9]', text, re.M)
    assert 'sandboxd_http_request_duration_seconds_count{method="POST",route="/v1/jobs",code="201"}' in text


def test_openapi_describes_every_route(api):
    document = api.request("GET", "/openapi.json", api.keys["alice"]).json()
    assert document["openapi"].startswith("3.")
    context = ServiceContext(*([None] * 7))  # the router is all this test reads
    # Judge0's and Piston's APIs are theirs: their own projects document them.
    served = {(route.resource.canonical, route.method.lower()) for route in create_app(context).router.routes()
              if route.method != "HEAD" and not route.resource.canonical.startswith(("/judge0/", "/piston/"))}
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert served == described


def test_images_lists_the_built_in_image(api):
    images = api.request("GET", "/v1/images", api.keys["alice"]).json()["images"]
    assert "host" in {image["name"] for image in images}


def test_structured_logs_have_one_line_per_request_and_per_transition(api):
    job = api.run(api.keys["bob"], {"cmd": ["true"]})
    # Lines are written on the loop's turn after the answer: once a later request is
    # answered, the loop has been past them.
    api.request("GET", "/healthz")
    events = api.log_events()
    mine = [e for e in events if e.get("job_id") == job["id"]]
    assert {"job.accepted", "job.running", "job.finished"} <= {e["event"] for e in mine}
    assert all(e["tenant"] == "bob" for e in mine)
    requests = [e for e in events if e["event"] == "request" and e.get("tenant") == "bob"]
    assert requests and {"method", "path", "status", "duration_ms"} <= set(requests[-1])


def test_a_job_runs_over_a_built_image_named_with_or_without_its_tag(api, tmp_path):
    import io as _io

    from sandboxd.images.build import build_image
    from sandboxd.images.spec import parse_spec

    spec = parse_spec("FROM host\nRUN echo built > /opt/mark\n", "Imagefile")
    build_image(spec, "Imagefile", tmp_path, "marked", api.state_dir, _io.StringIO())
    names = {image["name"] for image in api.request("GET", "/v1/images", api.keys["alice"]).json()["images"]}
    assert {"host", "marked:latest"} <= names
    for image in ("marked", "marked:latest"):
        job = api.run(api.keys["alice"], {"cmd": ["cat", "/opt/mark"], "image": image})
        assert (job["image"], job["result"]["stdout"]) == ("marked:latest", "built\n")
    assert api.request("POST", "/v1/jobs", api.keys["alice"], {"cmd": ["true"], "image": "unbuilt"}).status == 422
