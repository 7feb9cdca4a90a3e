"""Image references as Docker writes them: which part names a registry, and the defaults."""

from __future__ import annotations

import pytest

from sandboxd.images.reference import ReferenceError, remote_reference, split_reference


@pytest.mark.parametrize(("text", "registry", "path", "tag", "digest"), [
    ("judge", None, "judge", None, None),
    ("team/judge:v1", None, "team/judge", "v1", None),
    ("registry.example/judge", "registry.example", "judge", None, None),
    ("127.0.0.1:5000/a/b:1.0", "127.0.0.1:5000", "a/b", "1.0", None),
    ("localhost/x@sha256:" + "a" * 64, "localhost", "x", None, "sha256:" + "a" * 64),
    ("[::1]:5000/x:t", "[::1]:5000", "x", "t", None),
])
def test_a_first_component_with_a_dot_a_port_or_localhost_names_the_registry(text, registry, path, tag, digest):
    assert split_reference(text) == (split_reference(text).__class__(registry, path, tag, digest))


@pytest.mark.parametrize(("text", "expected"), [
    ("debian", "docker.io/library/debian:latest"),
    ("debian:12", "docker.io/library/debian:12"),
    ("team/tool", "docker.io/team/tool:latest"),
    ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
])
def test_a_remote_reference_defaults_to_docker_hub_and_latest(text, expected):
    assert str(remote_reference(text)) == expected


def test_an_image_pulled_by_digest_alone_is_named_by_it():
    reference = remote_reference("127.0.0.1:5000/x@sha256:" + "b" * 64)
    assert reference.tag is None
    assert reference.local_name() == "127.0.0.1:5000/x:sha256-" + "b" * 64


@pytest.mark.parametrize(("text", "complaint"), [
    ("", "empty"),
    ("Upper/x", "invalid image name"),
    ("x:", "invalid tag"),
    ("x:-bad", "invalid tag"),
    ("x@sha512:" + "a" * 128, "only sha256"),
    ("x@sha256:short", "only sha256"),
    ("bad_host.example:99999999/x", "invalid registry"),
    ("a//b", "invalid image name"),
])
def test_malformed_references_say_which_part_is_wrong(text, complaint):
    with pytest.raises(ReferenceError, match=complaint):
        split_reference(text)
