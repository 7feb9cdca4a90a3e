"""The language catalogue: the shipped one loads; every kind of malformed catalogue is refused
with a message naming the language and the fault; the compile-once, run-many jobs; and, in
real containers, every shipped language works on this machine, unless its toolchain really
is not installed here (the cgroup-v2 VM has a JRE but no javac), and broken ones are
reported unavailable with a reason."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import subprocess
import tarfile

import pytest

from sandboxd.images import Image
from sandboxd.job import InputFile, internal_error_result
from sandboxd.judge.languages import (
    PROBE_LINE,
    ArtifactError,
    Language,
    LanguageError,
    compile_job,
    compiled_files,
    expand_argv,
    load_languages,
    parse_version,
    probe_language,
    run_job,
    version_job,
)
from sandboxd.limits import LimitError, default_limit_policy

SHIPPED = load_languages()
# What a job of the host image finds its commands on: the host's own /usr.
IMAGE_PATH = dict(next(field for field in dataclasses.fields(Image) if field.name == "env").default)["PATH"]


# --- the shipped catalogue -------------------------------------------------------------------

def test_the_shipped_catalogue_loads_with_every_language():
    assert list(SHIPPED) == ["c", "cpp", "python", "java", "javascript", "bash"]
    assert {language.id: language.judge0_id for language in SHIPPED.values()} == {
        "c": 50, "cpp": 52, "python": 71, "java": 62, "javascript": 63, "bash": 46}
    assert {language.id: language.source_file for language in SHIPPED.values()} == {
        "c": "main.c", "cpp": "main.cpp", "python": "main.py", "java": "Main.java", "javascript": "main.js",
        "bash": "main.sh"}
    for language in SHIPPED.values():
        assert language.image == "host" and language.name
        assert language.probe_source.strip()


def test_the_shipped_piston_names():
    names = {language.id: language.piston_names for language in SHIPPED.values()}
    assert names["c"] == ("c", "gcc")
    assert names["cpp"] == ("c++", "cpp", "g++")
    assert set(names["python"]) >= {"python", "py", "python3"}
    assert names["java"] == ("java",)
    assert set(names["javascript"]) >= {"javascript", "js", "node-javascript", "node"}
    assert names["bash"] == ("bash", "sh")


def test_the_shipped_commands():
    assert SHIPPED["c"].compile_argv == ("gcc", "-std=gnu11", "-O2", "-pipe", "-o", "main", "main.c", "-lm")
    assert SHIPPED["cpp"].compile_argv == ("g++", "-std=gnu++17", "-O2", "-pipe", "-o", "main", "main.cpp")
    assert SHIPPED["c"].run_argv == SHIPPED["cpp"].run_argv == ("./main",)
    assert SHIPPED["python"].compile_argv == ("python3", "-m", "py_compile", "main.py")
    assert SHIPPED["javascript"].compile_argv == ("node", "--check", "main.js")
    assert SHIPPED["bash"].compile_argv is None
    assert SHIPPED["java"].run_argv[-3:] == ("-cp", ".", "Main")


def test_the_shipped_limits_give_compilers_and_the_jvm_room():
    defaults = default_limit_policy().defaults
    for language in SHIPPED.values():
        assert language.compile_limits.cpu_time_s >= defaults.cpu_time_s
        assert language.compile_limits.output_bytes >= 64 << 20 or language.compile_argv is None
    java = SHIPPED["java"]
    assert java.compile_limits.memory_bytes >= 1 << 30
    assert java.compile_limits.pids >= 128 and java.run_limits.pids >= 128
    assert java.run_limits.memory_bytes > SHIPPED["c"].run_limits.memory_bytes
    assert SHIPPED["c"].run_limits == defaults
    assert dict(java.run_limit_overrides) == {"memory": "512m", "pids": 128}


def test_a_requests_limits_layer_on_the_catalogues_run_limits():
    java = SHIPPED["java"]
    assert java.run_limits_with({}) == java.run_limits
    raised = java.run_limits_with({"memory": "1g", "cpu_time": 2})
    assert (raised.memory_bytes, raised.cpu_time_s, raised.pids) == (1 << 30, 2.0, 128)
    with pytest.raises(LimitError, match="request: memory"):
        java.run_limits_with({"memory": "99t"}, where="request")


def test_the_jvm_is_told_its_memory_limit():
    java = SHIPPED["java"]
    limits = java.run_limits_with({"memory": "300m"})
    argv = run_job(java, (), None, limits).argv
    assert f"-XX:MaxRAM={300 << 20}" in argv
    assert not any("{" in arg for arg in argv)
    assert f"-J-XX:MaxRAM={java.compile_limits.memory_bytes}" in compile_job(java, b"").argv
    assert expand_argv(("a{memory_bytes}b", "{}", "${x}"), limits) == (f"a{300 << 20}b", "{}", "${x}")


# --- malformed catalogues --------------------------------------------------------------------

# A valid language, as TOML values; the variants below replace or drop one of them.
VALID = {
    "id": '"c"',
    "name": '"C"',
    "image": '"host"',
    "source_file": '"main.c"',
    "compile": '["gcc", "-o", "main", "main.c"]',
    "run": '["./main"]',
    "version": '["gcc", "-dumpfullversion"]',
    "judge0_id": "50",
    "piston": '["c", "gcc"]',
    "probe": '"int main(void) { return 0; }"',
}
OTHER = {"id": '"cpp"', "judge0_id": "54", "piston": '["c++", "cpp"]'}


def table(**changes: str | None) -> str:
    fields = {**VALID, **changes}
    return "[[language]]\n" + "".join(f"{key} = {value}\n" for key, value in fields.items() if value is not None)


def test_a_valid_catalogue_loads():
    languages = load_languages(table() + table(**OTHER))
    assert list(languages) == ["c", "cpp"]
    c = languages["c"]
    assert c == Language(
        id="c", name="C", image="host", source_file="main.c", compile_argv=("gcc", "-o", "main", "main.c"),
        run_argv=("./main",), version_argv=("gcc", "-dumpfullversion"),
        compile_limits=default_limit_policy().defaults, run_limits=default_limit_policy().defaults,
        run_limit_overrides=(), judge0_id=50, piston_names=("c", "gcc"), probe_source="int main(void) { return 0; }")
    assert load_languages(table(compile=None))["c"].compile_argv is None
    limited = load_languages(table(compile_limits='{ cpu_time = 20, memory = "1g" }', run_limits="{ pids = 8 }"))["c"]
    assert (limited.compile_limits.cpu_time_s, limited.compile_limits.memory_bytes) == (20.0, 1 << 30)
    assert limited.run_limits.pids == 8 and limited.run_limit_overrides == (("pids", 8),)


C = "languages.toml: language 'c': "

MALFORMED = [
    # The file as a whole.
    ("", "languages.toml: no languages (expected [[language]] tables)"),
    ("language = 3", "languages.toml: no languages"),
    ("language = []", "languages.toml: no languages"),
    ("[[language]\n", "languages.toml: "),  # not TOML
    ("languages = []\n" + table(), "languages.toml: unknown key 'languages' (only [[language]] tables belong here)"),
    ("language = [1]", "languages.toml: language #1: expected a [[language]] table"),
    # Keys.
    (table(colour='"red"'), C + "unknown key 'colour' (known: id, name, image, source_file, run, version, "
                                "judge0_id, piston, probe, compile, compile_limits, run_limits, memory_error)"),
    (table(run=None), C + "missing run"),
    (table(run=None, probe=None), C + "missing run, probe"),
    (table(id=None), "languages.toml: language #1: missing id"),
    (table() + table(id=None, **{k: v for k, v in OTHER.items() if k != "id"}), "languages.toml: language #2: missing id"),
    # Ids and names.
    (table(id='"C Lang"'), "languages.toml: language #1: id 'C Lang' must match"),
    (table(id='"Cpp"'), "languages.toml: language #1: id 'Cpp' must match"),
    (table(id="3"), "languages.toml: language #1: id 3 must match"),
    (table() + table(judge0_id="54", piston='["cpp"]'), C + "a language of this id is already listed"),
    (table(name='""'), C + "name must be a non-empty string, got ''"),
    (table(name="1"), C + "name must be a non-empty string, got 1"),
    (table(image='" "'), C + "image must be a non-empty string"),
    (table(probe='""'), C + "probe must be a non-empty string"),
    # The source file.
    (table(source_file='"src/main.c"'), C + "source_file 'src/main.c' must be a plain file name"),
    (table(source_file='".."'), C + "source_file '..' must be a plain file name"),
    (table(source_file='""'), C + "source_file '' must be a plain file name"),
    (table(source_file='"-o.c"'), C + "source_file '-o.c' must be a plain file name"),
    (table(source_file='"main c"'), C + "source_file 'main c' must be a plain file name"),
    (table(source_file="1"), C + "source_file 1 must be a plain file name"),
    # Argv lists.
    (table(run='"./main"'), C + "run must be a non-empty list of strings (an argv), got './main'"),
    (table(run="[]"), C + "run must be a non-empty list of strings (an argv), got []"),
    (table(compile='["gcc", ""]'), C + "compile: every argument must be a non-empty string without NUL, got ''"),
    (table(compile='["gcc", 2]'), C + "compile: every argument must be a non-empty string without NUL, got 2"),
    (table(version='["gcc", "a\\u0000b"]'), C + "version: every argument must be a non-empty string without NUL"),
    (table(compile="[]"), C + "compile must be a non-empty list of strings"),
    (table(run='["java", "-Xmx{memory_mb}m"]'), C + "run: unknown placeholder {memory_mb} in '-Xmx{memory_mb}m' "
                                                   "(known: {memory_bytes})"),
    # Limits.
    (table(compile_limits='{ cpu = 5 }'), C + "compile_limits: unknown limit 'cpu'"),
    (table(run_limits='{ memory = "99t" }'), C + "run_limits: memory"),  # past the policy's maximum
    (table(run_limits='{ memory = "lots" }'), C + "run_limits: memory: not a size: 'lots'"),
    (table(run_limits="{ pids = 0 }"), C + "run_limits: pids must be at least 1"),
    (table(compile_limits='"big"'), C + "compile_limits must be a table of limits, got 'big'"),
    # Judge0 ids.
    (table(judge0_id='"50"'), C + "judge0_id must be a positive integer, got '50'"),
    (table(judge0_id="true"), C + "judge0_id must be a positive integer, got True"),
    (table(judge0_id="0"), C + "judge0_id must be a positive integer, got 0"),
    (table(judge0_id="-50"), C + "judge0_id must be a positive integer, got -50"),
    (table(judge0_id="50.0"), C + "judge0_id must be a positive integer, got 50.0"),
    (table() + table(**{**OTHER, "judge0_id": "50"}), "languages.toml: language 'cpp': judge0_id 50 is language "
                                                       "'c''s already"),
    # Piston names.
    (table(piston="[]"), C + "piston must be a non-empty list of names, got []"),
    (table(piston='"c"'), C + "piston must be a non-empty list of names, got 'c'"),
    (table(piston='["C"]'), C + "piston: 'C' is not a name"),
    (table(piston='["c lang"]'), C + "piston: 'c lang' is not a name"),
    (table(piston='[""]'), C + "piston: '' is not a name"),
    (table(piston='["c", "c"]'), C + "piston lists a name twice"),
    (table() + table(**{**OTHER, "piston": '["cpp", "gcc"]'}), "languages.toml: language 'cpp': piston name 'gcc' "
                                                                "is language 'c''s already"),
]


@pytest.mark.parametrize("text, message", MALFORMED)
def test_a_malformed_catalogue_is_refused_with_a_clear_message(text, message):
    with pytest.raises(LanguageError) as raised:
        load_languages(text)
    assert str(raised.value).startswith(message)


# --- the jobs: compile once, run many --------------------------------------------------------

def test_the_compile_job_packs_the_work_directory_after_compiling():
    c = SHIPPED["c"]
    spec = compile_job(c, b"int main(void) { return 0; }")
    assert spec.argv[:2] == ("sh", "-c") and spec.argv[4:] == c.compile_argv
    assert spec.files == (InputFile(path="main.c", content=b"int main(void) { return 0; }"),)
    assert spec.limits == c.compile_limits and spec.image == "host"
    with pytest.raises(ValueError, match="language 'bash' has no compile step"):
        compile_job(SHIPPED["bash"], b"echo")
    assert version_job(c).argv == ("gcc", "-dumpfullversion")


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, content in members:
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, target
    return info


def compile_result(stdout: bytes):
    return dataclasses.replace(internal_error_result(""), status="ok", exit_code=0, message=None, stdout=stdout)


def test_compiled_files_come_from_the_tar_with_their_execute_bits():
    stdout = tar_of((member(".", tarfile.DIRTYPE, 0o755), b""), (member("./main", mode=0o775), b"\x7fELF"),
                    (member("./main.c", mode=0o600), b"int main;"), (member("./pkg", tarfile.DIRTYPE), b""),
                    (member("./pkg/A.class", mode=0o644), b"\xca\xfe"))
    assert compiled_files(compile_result(stdout)) == (
        InputFile(path="main", content=b"\x7fELF", mode=0o755),
        InputFile(path="main.c", content=b"int main;", mode=0o644),
        InputFile(path="pkg/A.class", content=b"\xca\xfe", mode=0o644),
    )


@pytest.mark.parametrize("stdout, message", [
    (tar_of((member("./link", tarfile.SYMTYPE, target="/etc/passwd"), b"")), "compile output: 'link' is not a regular file"),
    (tar_of((member("./hard", tarfile.LNKTYPE, target="main"), b"")), "compile output: 'hard' is not a regular file"),
    (tar_of((member("./fifo", tarfile.FIFOTYPE), b"")), "compile output: 'fifo' is not a regular file"),
    (tar_of((member("../escape"), b"x")), "compile output: file destination '../escape' has an empty, '.' or '..'"),
    (tar_of((member("/etc/cron.d/x"), b"x")), "compile output: file destination '/etc/cron.d/x' is outside"),
    (b"gcc: error: no input files\n" * 40, "compile output is not a tar archive"),
])
def test_compiled_files_refuses_what_a_compiler_does_not_leave(stdout, message):
    with pytest.raises(ArtifactError) as raised:
        compiled_files(compile_result(stdout))
    assert str(raised.value).startswith(message)


def test_compile_once_run_many(runtime):
    c = SHIPPED["c"]
    source = b'#include <stdio.h>\nint main(void) { int a, b; scanf("%d %d", &a, &b); printf("%d\\n", a + b); }\n'
    compiled = runtime.run(compile_job(c, source))
    assert compiled.status == "ok", compiled
    files = compiled_files(compiled)
    assert {file.path: file.mode for file in files} == {"main": 0o755, "main.c": 0o644}
    for stdin, answer in [(b"2 40\n", b"42\n"), (b"-1 1\n", b"0\n")]:
        result = runtime.run(run_job(c, files, stdin))
        assert (result.status, result.stdout) == ("ok", answer)
    broken = runtime.run(compile_job(c, b"int main(void) { return x; }\n"))
    assert broken.status == "runtime_error" and broken.stdout == b""
    assert b"main.c:1:" in broken.stderr and b"error" in broken.stderr


# --- availability ----------------------------------------------------------------------------

def commands(language: Language) -> list[str]:
    """The programs a language's jobs look up on PATH (./main is the compile's)."""
    argvs = [language.compile_argv, language.run_argv, language.version_argv]
    return list(dict.fromkeys(argv[0] for argv in argvs if argv and "/" not in argv[0]))


def missing_commands(language: Language) -> list[str]:
    return [command for command in commands(language) if shutil.which(command, path=IMAGE_PATH) is None]


def host_version(language: Language) -> str | None:
    """The version the host's own toolchain reports, run outside any container."""
    command = shutil.which(language.version_argv[0], path=IMAGE_PATH)
    assert command is not None
    done = subprocess.run([command, *language.version_argv[1:]], capture_output=True, timeout=60)
    return parse_version(done.stdout) or parse_version(done.stderr)


@pytest.mark.parametrize("language_id", list(SHIPPED))
def test_every_shipped_language_works_here(runtime, language_id):
    language = SHIPPED[language_id]
    status = probe_language(runtime, language)
    missing = missing_commands(language)
    if missing:  # only then may it be unavailable: the VM lane's JRE has no javac
        assert not status.available and status.reason, (missing, status)
        return
    assert status.available, status.reason
    assert status.reason is None
    assert re.fullmatch(r"\d+(\.\d+)*", status.version or ""), status.version
    assert status.version == host_version(language)


@pytest.mark.parametrize("version_output, version", [
    (b"12.2.0\n", "12.2.0"),
    (b"Python 3.11.2\n", "3.11.2"),
    (b'openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment (build 17.0.15+6)\n', "17.0.15"),
    (b'openjdk version "21" 2023-09-19\n', "21"),
    (b"v20.20.2\n", "20.20.2"),
    (b"GNU bash, version 5.2.15(1)-release (x86_64-pc-linux-gnu)\n", "5.2.15"),
    (b"\n  \njavac 17.0.15\n", "17.0.15"),
    (b"development build\n", "development build"),
    (b"", None),
    (b" \n", None),
])
def test_parse_version(version_output, version):
    assert parse_version(version_output) == version


def test_a_missing_compiler_makes_a_language_unavailable(runtime):
    broken = dataclasses.replace(SHIPPED["c"], compile_argv=("no-such-compiler", "main.c"))
    status = probe_language(runtime, broken)
    assert not status.available
    assert status.reason.startswith("compile failed: exit code 127 (command not found?)"), status.reason
    assert "no-such-compiler" in status.reason


def test_a_missing_interpreter_makes_a_language_unavailable(runtime):
    broken = dataclasses.replace(SHIPPED["bash"], version_argv=("no-such-shell", "--version"))
    status = probe_language(runtime, broken)
    assert status == dataclasses.replace(status, available=False, version=None)
    assert status.reason.startswith("version command failed: exit code 127"), status.reason


def test_a_probe_that_does_not_echo_makes_a_language_unavailable(runtime):
    status = probe_language(runtime, dataclasses.replace(SHIPPED["bash"], probe_source="echo something else\n"))
    assert not status.available and status.version
    assert status.reason == ("run: the probe program did not print its input back: line 1: expected "
                             f"{PROBE_LINE.decode().strip()!r}, got 'something else'")


def test_a_probe_that_fails_to_compile_makes_a_language_unavailable(runtime):
    status = probe_language(runtime, dataclasses.replace(SHIPPED["c"], probe_source="int main(void) { return x; }\n"))
    assert not status.available
    assert status.reason.startswith("compile failed: exit code 1: main.c:"), status.reason


def test_a_probe_that_crashes_makes_a_language_unavailable(runtime):
    status = probe_language(runtime, dataclasses.replace(SHIPPED["bash"], probe_source="echo oops >&2; exit 3\n"))
    assert not status.available
    assert status.reason == "run failed: exit code 3: oops"


def test_a_language_on_a_missing_image_is_unavailable(runtime):
    status = probe_language(runtime, dataclasses.replace(SHIPPED["bash"], image="no-such-image"))
    assert status.available is False and status.version is None
    assert status.reason == "image 'no-such-image' does not exist"
