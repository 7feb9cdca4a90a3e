"""Image spec parsing: every instruction form, every rejection (with its NAME:LINE: prefix), line
handling (continuations, comments, CRLF) and the size limits. Pure parsing, no files."""

from __future__ import annotations

import pytest

from sandboxd.images.spec import (
    MAX_INSTRUCTIONS,
    MAX_LINE_BYTES,
    MAX_SPEC_BYTES,
    Copy,
    Env,
    From,
    Label,
    Run,
    Spec,
    SpecError,
    User,
    Workdir,
    parse_spec,
)

NAME = "demo.Imagefile"


def parse(text: str) -> Spec:
    return parse_spec(text, NAME)


def only_step(text: str):
    (step,) = parse("FROM host\n" + text).steps
    return step


def rejected(text: str, line: int, *words: str) -> str:
    with pytest.raises(SpecError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith(f"{NAME}:{line}: "), message
    for word in words:
        assert word in message, (word, message)
    return message


# FROM

@pytest.mark.parametrize("image", [
    "scratch",
    "host",
    "python",
    "python:3.12-slim",
    "team/tool_x.v2",
    "registry.example:5000/team/name:tag",
    "localhost/name",
    "ghcr.io/org/repo@sha256:" + "0123456789abcdef" * 4,
    "name:tag@sha256:" + "a" * 64,
])
def test_from_accepts_scratch_host_local_and_registry_references(image):
    spec = parse(f"FROM {image}\n")
    assert spec.base == From(line=1, keyword="FROM", text=f"FROM {image}", image=image)
    assert spec.steps == ()


@pytest.mark.parametrize("image", [
    "Ubuntu",
    "name:-tag",
    "name@sha256:" + "A" * 64,
    "name@sha256:abc",
    "team//name",
    "name:" + "t" * 129,
    "-name",
    "https://registry.example/name",
])
def test_from_rejects_malformed_image_references(image):
    rejected(f"FROM {image}\n", 1, "invalid image reference", repr(image))


def test_comments_and_blank_lines_may_precede_from_and_line_numbers_count_them():
    spec = parse("# syntax=docker/dockerfile:1\n\n  # escape=`\nFROM host\nRUN true\n")
    assert spec.base.line == 4
    assert spec.steps[0].line == 5


def test_from_with_as_is_rejected_as_multi_stage():
    rejected("FROM python:3.12 AS build\n", 1, "multi-stage", "not supported")


def test_a_second_from_is_rejected_as_multi_stage_at_its_line():
    rejected("FROM host\nRUN true\nFROM scratch\n", 3, "multi-stage builds are not supported", "line 1")


def test_from_with_two_images_is_rejected():
    rejected("FROM host scratch\n", 1, "exactly one image")


def test_from_flags_are_rejected():
    rejected("FROM --platform=linux/amd64 host\n", 1, "--platform", "not supported")


def test_an_instruction_before_from_is_rejected():
    rejected("# setup\nRUN true\nFROM host\n", 2, "first instruction must be FROM", "RUN")


def test_a_spec_without_instructions_is_rejected_as_a_whole():
    rejected("# only a comment\n\n", 0, "no FROM")


# RUN

def test_run_shell_form_runs_the_text_under_sh_c_without_network():
    step = only_step("RUN apt-get install -y gcc\n")
    assert step == Run(line=2, keyword="RUN", text="RUN apt-get install -y gcc",
                       argv=("/bin/sh", "-c", "apt-get install -y gcc"), network=False)


def test_run_exec_form_is_the_json_argv():
    step = only_step('RUN ["gcc", "--version"]\n')
    assert isinstance(step, Run)
    assert step.argv == ("gcc", "--version")


def test_run_starting_with_a_bracket_that_is_not_json_is_shell_form():
    step = only_step("RUN [ -f /etc/os-release ] && echo yes\n")
    assert step.argv == ("/bin/sh", "-c", "[ -f /etc/os-release ] && echo yes")


@pytest.mark.parametrize("array", ["[]", '["gcc", 1]', "[null]"])
def test_run_exec_form_must_be_a_non_empty_array_of_strings(array):
    rejected(f"FROM host\nRUN {array}\n", 2, "non-empty JSON array of strings")


def test_run_exec_form_rejects_an_escaped_nul():
    rejected('FROM host\nRUN ["a\\u0000b"]\n', 2, "NUL")


def test_run_network_default_turns_the_network_on_and_none_keeps_it_off():
    on = only_step("RUN --network=default curl -O https://example.org/x\n")
    off = only_step('RUN --network=none ["make"]\n')
    assert on.network is True and on.argv == ("/bin/sh", "-c", "curl -O https://example.org/x")
    assert off.network is False and off.argv == ("make",)


def test_run_network_host_is_rejected():
    rejected("FROM host\nRUN --network=host true\n", 2, "--network=host", "not supported")


def test_run_rejects_any_other_flag_by_name():
    rejected("FROM host\nRUN --mount=type=cache,target=/root true\n", 2, "--mount", "not supported")


def test_run_without_a_command_is_rejected():
    rejected("FROM host\nRUN --network=none\n", 2, "RUN needs a command")


# COPY

def test_copy_shell_form_with_quotes_and_an_absolute_destination():
    step = only_step("COPY 'my file.txt' \"src/a b\" /opt/app/\n")
    assert step == Copy(line=2, keyword="COPY", text="COPY 'my file.txt' \"src/a b\" /opt/app/",
                        sources=("my file.txt", "src/a b"), destination="/opt/app/", chown=None, chmod=None)


def test_copy_json_form():
    step = only_step('COPY ["a b.txt", "c", "/dest dir/"]\n')
    assert step.sources == ("a b.txt", "c")
    assert step.destination == "/dest dir/"


def test_copy_chown_and_chmod_are_numeric_and_chown_gid_defaults_to_uid():
    both = only_step("COPY --chown=1000:2000 --chmod=0755 run.sh /usr/local/bin/run\n")
    uid_only = only_step("COPY --chown=1000 --chmod=644 a /a\n")
    assert both.chown == (1000, 2000) and both.chmod == 0o755
    assert uid_only.chown == (1000, 1000) and uid_only.chmod == 0o644


def test_copy_chown_by_name_is_rejected():
    rejected("FROM host\nCOPY --chown=app:app a /a\n", 2, "numeric", "names are not supported")


@pytest.mark.parametrize("mode", ["rwx", "0o755", "8", "17777"])
def test_copy_chmod_must_be_octal(mode):
    rejected(f"FROM host\nCOPY --chmod={mode} a /a\n", 2, "octal")


def test_copy_rejects_other_flags_by_name():
    rejected("FROM host\nCOPY --from=build /out /out\n", 2, "--from", "not supported")


def test_copy_rejects_a_flag_given_twice():
    rejected("FROM host\nCOPY --chmod=600 --chmod=644 a /a\n", 2, "--chmod", "twice")


def test_copy_needs_a_source_and_a_destination():
    rejected("FROM host\nCOPY onlyone\n", 2, "at least one source and a destination")


@pytest.mark.parametrize("source, words", [
    ("/etc/passwd", ("absolute",)),
    ("../secret", ("'..'",)),
    ("a/../../b", ("'..'",)),
    ('""', ("empty source",)),
])
def test_copy_rejects_sources_outside_the_build_context_or_empty(source, words):
    rejected(f"FROM host\nCOPY {source} /dest/\n", 2, *words)


def test_copy_rejects_a_nul_in_a_json_source():
    rejected('FROM host\nCOPY ["a\\u0000", "/d"]\n', 2, "NUL")


def test_copy_accepts_dot_dot_inside_a_name_that_is_not_a_component():
    assert only_step("COPY a..b /x\n").sources == ("a..b",)


def test_copy_with_several_sources_needs_a_directory_destination():
    rejected("FROM host\nCOPY a b /dest\n", 2, "several sources", "'/'")


def test_copy_relative_destination_resolves_against_the_current_workdir():
    spec = parse("FROM host\nCOPY a rel\nWORKDIR /app\nCOPY b c sub/\nCOPY d .\nCOPY e ../../../up\n")
    destinations = [step.destination for step in spec.steps if isinstance(step, Copy)]
    assert destinations == ["/rel", "/app/sub/", "/app/", "/up"]


def test_copy_destination_is_normalised_without_a_double_leading_slash():
    assert only_step("COPY a //x/./y/../z\n").destination == "/x/z"


def test_copy_unterminated_quote_names_the_line():
    rejected("FROM host\nRUN true\nCOPY 'a /b\n", 3, "unterminated")


# ENV

def test_env_pairs_with_double_and_single_quotes_and_escapes():
    step = only_step('ENV A=1 B="two words" C=\'it\'"\'"\'s\' D="q\\"x\\\\y\\n" E= F=x=y\n')
    assert isinstance(step, Env)
    assert step.pairs == (("A", "1"), ("B", "two words"), ("C", "it's"), ("D", 'q"x\\y\\n'),
                          ("E", ""), ("F", "x=y"))


def test_env_keeps_dollar_variables_literally():
    assert only_step("ENV PATH=/opt/bin:$PATH\n").pairs == (("PATH", "/opt/bin:$PATH"),)


def test_env_legacy_form_takes_the_rest_of_the_line_as_the_value():
    assert only_step("ENV GREETING hello   big world\n").pairs == (("GREETING", "hello   big world"),)


def test_env_legacy_form_without_a_value_is_rejected():
    rejected("FROM host\nENV LONELY\n", 2, "LONELY", "needs a value")


@pytest.mark.parametrize("text", ["ENV 1A=x", "ENV A-B=x", "ENV A=1 B.C=2"])
def test_env_rejects_invalid_keys(text):
    rejected(f"FROM host\n{text}\n", 2, "invalid ENV key")


def test_env_new_form_rejects_a_word_without_equals():
    rejected("FROM host\nENV A=1 B\n", 2, "KEY=VALUE", "'B'")


def test_env_unterminated_quote_names_the_line():
    rejected('FROM host\nENV A="open\n', 2, "unterminated")


# LABEL

def test_label_pairs_allow_dots_dashes_and_slashes_in_keys():
    step = only_step('LABEL org.opencontainers.image.title="My tool" com.example/team-name=infra\n')
    assert step == Label(line=2, keyword="LABEL",
                         text='LABEL org.opencontainers.image.title="My tool" com.example/team-name=infra',
                         pairs=(("org.opencontainers.image.title", "My tool"), ("com.example/team-name", "infra")))


def test_label_rejects_keys_with_other_characters_and_the_legacy_form():
    rejected("FROM host\nLABEL bad:key=1\n", 2, "invalid LABEL key")
    rejected("FROM host\nLABEL version 1.0\n", 2, "KEY=VALUE")


# WORKDIR

def test_workdir_chains_relative_paths_and_normalises():
    spec = parse("FROM host\nWORKDIR /srv\nWORKDIR app\nWORKDIR ./x/../y/\nWORKDIR /abs/../root\n")
    assert [step.path for step in spec.steps] == ["/srv", "/srv/app", "/srv/app/y", "/root"]


def test_workdir_relative_at_the_start_is_relative_to_root_and_may_be_quoted_with_spaces():
    spec = parse('FROM host\nWORKDIR work\nWORKDIR "my dir"\n')
    assert spec.steps == (Workdir(line=2, keyword="WORKDIR", text="WORKDIR work", path="/work"),
                          Workdir(line=3, keyword="WORKDIR", text='WORKDIR "my dir"', path="/work/my dir"))


def test_workdir_without_a_path_is_rejected():
    rejected("FROM host\nWORKDIR\n", 2, "WORKDIR needs a path")


# USER

def test_user_gid_defaults_to_uid():
    assert only_step("USER 1000\n") == User(line=2, keyword="USER", text="USER 1000", uid=1000, gid=1000)
    assert only_step("USER 0:65534\n") == User(line=2, keyword="USER", text="USER 0:65534", uid=0, gid=65534)


@pytest.mark.parametrize("value", ["alice", "1000:staff", "١٠٠٠", "1_000"])
def test_user_names_and_non_ascii_digits_are_rejected(value):
    rejected(f"FROM host\nUSER {value}\n", 2, "numeric", "names are not supported")


def test_user_id_out_of_range_is_rejected():
    rejected("FROM host\nUSER 4294967295\n", 2, "out of range")


# Unsupported and unknown instructions

@pytest.mark.parametrize("keyword", ["CMD", "ENTRYPOINT", "EXPOSE", "VOLUME", "ARG", "ONBUILD",
                                     "HEALTHCHECK", "SHELL", "STOPSIGNAL", "MAINTAINER"])
def test_unsupported_instructions_are_named(keyword):
    rejected(f"FROM host\n{keyword} something\n", 2, f"{keyword} is not supported")


def test_add_is_rejected_with_a_pointer_to_copy():
    rejected("FROM host\nadd https://example.org/x.tgz /x\n", 2, "ADD is not supported", "use COPY")


def test_unknown_instructions_are_named():
    rejected("FROM host\nFETCH it\n", 2, "unknown instruction", "FETCH")


def test_a_nul_in_the_text_is_rejected():
    rejected("FROM host\nRUN echo \0\n", 2, "NUL")


# Lines

def test_keywords_are_case_insensitive_and_text_keeps_the_written_case():
    spec = parse("from host\nRun true\ncOpY a /a\n")
    assert [step.keyword for step in (spec.base, *spec.steps)] == ["FROM", "RUN", "COPY"]
    assert spec.steps[0].text == "Run true"


def test_a_continued_line_is_one_instruction_and_keeps_its_first_line_number():
    spec = parse("FROM host\nRUN apt-get update && \\\n    apt-get install -y gcc\nUSER 1\n")
    run, user = spec.steps
    assert run.line == 2 and user.line == 4
    assert run.argv == ("/bin/sh", "-c", "apt-get update &&     apt-get install -y gcc")
    assert run.text == "RUN apt-get update &&     apt-get install -y gcc"


def test_comment_and_blank_lines_inside_a_continuation_are_skipped():
    spec = parse("FROM host\nRUN echo a \\\n  # not part of it\n\n  && echo b\nUSER 2\n")
    run, user = spec.steps
    assert run.argv[2] == "echo a   && echo b"
    assert user.line == 6


def test_a_backslash_followed_by_trailing_blanks_still_continues():
    assert only_step("ENV A=1 \\  \n B=2\n").pairs == (("A", "1"), ("B", "2"))


def test_a_hash_after_an_instruction_is_not_a_comment():
    assert only_step("RUN echo # kept\n").argv[2] == "echo # kept"


def test_crlf_line_endings_parse_like_lf():
    crlf = parse("FROM host\r\nRUN echo a \\\r\n  b\r\nENV A=1\r\n")
    lf = parse("FROM host\nRUN echo a \\\n  b\nENV A=1\n")
    assert crlf == lf
    assert crlf.steps[1].pairs == (("A", "1"),)


def test_a_leading_byte_order_mark_is_ignored():
    assert parse("\ufeffFROM host\n").base.image == "host"


# Limits

def test_a_spec_larger_than_the_limit_is_rejected_as_a_whole():
    text = "FROM host\n" + "#" * MAX_SPEC_BYTES
    rejected(text, 0, "bytes", str(MAX_SPEC_BYTES))


def test_a_spec_at_the_size_limit_is_accepted():
    text = "FROM host\n"
    text += "#" * (MAX_SPEC_BYTES - len(text))
    assert parse(text).base.image == "host"


def test_more_than_the_instruction_limit_is_rejected_at_the_first_extra_instruction():
    at_limit = "FROM host\n" + "RUN true\n" * (MAX_INSTRUCTIONS - 1)
    assert len(parse(at_limit).steps) == MAX_INSTRUCTIONS - 1
    rejected(at_limit + "RUN true\n", MAX_INSTRUCTIONS + 1, "more than", str(MAX_INSTRUCTIONS))


def test_an_instruction_longer_than_the_line_limit_is_rejected_even_when_continued():
    half = "x" * (MAX_LINE_BYTES // 2)
    rejected(f"FROM host\nUSER 1\nRUN {half}\\\n{half}\n", 3, "bytes", str(MAX_LINE_BYTES))
    fits = "x" * (MAX_LINE_BYTES - len("RUN "))
    assert only_step(f"RUN {fits}\n").argv[2] == fits


def test_instructions_are_frozen():
    step = only_step("USER 1\n")
    with pytest.raises(AttributeError):
        step.uid = 0
