"""Build and release tooling: `make build`, the baked metadata, build.sh, the Dockerfile."""

from __future__ import annotations

import ast
import calendar
import json
import os
import queue
import re
import shlex
import shutil
import site
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from opensandbox_ingress import buildinfo
from tests.processes import REPO, free_port, stop

OVERRIDES = {
    "VERSION": "9.8.7-test",
    "GIT_COMMIT": "0123456789abcdef0123456789abcdef01234567",
    "BUILD_TIME": "2001-02-03T04:05:06Z",
}
BUILD_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
BUILD_INFO = "opensandbox_ingress/_build_info.py"



def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would leak metadata or another make in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VERSION", "GIT_COMMIT", "BUILD_TIME", "SOURCE_DATE_EPOCH", "PYTHONPATH")
        and not k.startswith("OPENSANDBOX_INGRESS_")
        and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    }
    env.update(extra)
    return env


def _make(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["make", "--no-print-directory", f"PYTHON={sys.executable}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"make {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _baked(source: str) -> dict[str, str]:
    """The assignments of a generated _build_info.py."""
    return {
        node.targets[0].id: node.value.value  # type: ignore[attr-defined]
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }


def _wheel_and_sdist(dist: Path) -> tuple[Path, Path]:
    (wheel,) = dist.glob("opensandbox_ingress-*.whl")
    (sdist,) = dist.glob("opensandbox[-_]ingress-*.tar.gz")
    return wheel, sdist


def _baked_in(wheel: Path, sdist: Path) -> tuple[dict[str, str], dict[str, str]]:
    with zipfile.ZipFile(wheel) as z:
        in_wheel = _baked(z.read(BUILD_INFO).decode())
    with tarfile.open(sdist) as t:
        (member,) = [m for m in t.getmembers() if m.name.endswith("/" + BUILD_INFO)]
        extracted = t.extractfile(member)
        assert extracted is not None
        in_sdist = _baked(extracted.read().decode())
    return in_wheel, in_sdist


@pytest.fixture(scope="module")
def overridden_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`VERSION=... GIT_COMMIT=... BUILD_TIME=... make build DIST=tmp` (the default builder)."""
    dist = tmp_path_factory.mktemp("dist")
    _make("build", f"DIST={dist}", env=_clean_env(**OVERRIDES))
    return dist


def _read_until(proc: subprocess.Popen[bytes], needle: str, timeout: float) -> str:
    """Stdout of C{proc} up to and including the first line containing C{needle}."""
    lines: queue.Queue[bytes | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {needle!r} within {timeout}s; got {seen}") from None
        if line is None:
            raise AssertionError(f"exited {proc.wait()} before {needle!r}; got {seen}")
        seen.append(line.decode(errors="replace"))
        if needle in seen[-1]:
            return "".join(seen)


def _see_running_site_packages(python: str) -> None:
    """
    Let the virtualenv of C{python} import the dependencies installed for
    the interpreter running the tests, after its own packages.

    C{venv --system-site-packages} would not do: created from inside a
    virtualenv it exposes the base interpreter's site-packages, not the
    outer virtualenv's, where C{pip install '.[test]'} put the
    dependencies.  A C{.pth} line that starts with C{import} runs at
    start-up; C{site.addsitedir} appends each directory (and processes its
    own C{.pth} files), so the wheel installed in the venv still wins.
    """
    directories = list(site.getsitepackages())
    user_site = site.getusersitepackages()
    if site.ENABLE_USER_SITE and os.path.isdir(user_site):
        directories.append(user_site)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_outer_site_packages.pth").write_text(
        # One line, and no comprehension: site exec()s it with separate
        # globals and locals, where a comprehension cannot see `site`.
        f"import site; list(map(site.addsitedir, {directories!r}))\n"
    )


def test_built_wheel_logs_the_overridden_metadata(overridden_dist: Path, tmp_path: Path) -> None:
    """A wheel from `make build` with overrides, in a fresh venv, logs exactly those values."""
    wheel, sdist = _wheel_and_sdist(overridden_dist)
    assert _baked_in(wheel, sdist) == (OVERRIDES, OVERRIDES)
    with zipfile.ZipFile(wheel) as z:
        assert "twisted/plugins/opensandbox_ingress_plugin.py" in z.namelist()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = _clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run(
        # --ignore-installed: the same version installed system-wide (as CI
        # installs it) would otherwise count as "already satisfied".
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
         str(wheel)],
        check=True,
        capture_output=True,
        env=env,
    )
    _see_running_site_packages(python)
    # Outside the repository, the venv's copy shadows a checkout, an
    # editable or a system-wide install of the package.
    where = subprocess.run(
        [python, "-c", "import opensandbox_ingress; print(opensandbox_ingress.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    sandboxes = tmp_path / "sandboxes.json"
    sandboxes.write_text(json.dumps([]))
    proc = subprocess.Popen(
        [python, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "-l", "-", "opensandbox-ingress",
         "--provider-type", "file", "--sandboxes-file", str(sandboxes),
         "--listen", f"tcp:{free_port()}:interface=127.0.0.1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out = _read_until(proc, "opensandbox-ingress version=", timeout=30)
    finally:
        stop(proc)
    assert (
        f"opensandbox-ingress version={OVERRIDES['VERSION']} commit={OVERRIDES['GIT_COMMIT']} "
        f"built={OVERRIDES['BUILD_TIME']} python="
    ) in out


def test_make_build_defaults_come_from_git(tmp_path: Path) -> None:
    """Without overrides `make build` (the pip fallback) bakes git describe, HEAD and the UTC time."""
    before = (_git("describe", "--tags", "--always", "--dirty"), _git("rev-parse", "HEAD"))
    assert None not in before, "the tests run from a git checkout with git installed"
    started = time.time()
    _make("build", f"DIST={tmp_path}", "PYBUILD=pip", env=_clean_env())
    after = (_git("describe", "--tags", "--always", "--dirty"), _git("rev-parse", "HEAD"))
    in_wheel, in_sdist = _baked_in(*_wheel_and_sdist(tmp_path))
    assert in_wheel == in_sdist
    # Other work may commit during the build: either side of it is right.
    assert (in_wheel["VERSION"], in_wheel["GIT_COMMIT"]) in (before, after)
    assert BUILD_TIME_RE.match(in_wheel["BUILD_TIME"]), in_wheel
    built = calendar.timegm(time.strptime(in_wheel["BUILD_TIME"], "%Y-%m-%dT%H:%M:%SZ"))
    assert started - 5 <= built <= time.time() + 5
    assert not (REPO / BUILD_INFO).exists(), "the build wrote into the source tree"


def test_make_variables_follow_environment_and_source_date_epoch() -> None:
    """VERSION etc. are overridable from the environment; SOURCE_DATE_EPOCH fixes BUILD_TIME."""
    dry = _make("-n", "build", "image", env=_clean_env(SOURCE_DATE_EPOCH="1700000000", TAG="t1")).stdout
    assert "BUILD_TIME='2023-11-14T22:13:20Z'" in dry
    assert "-t 'opensandbox/ingress:t1'" in dry
    dry = _make("-n", "build", "image", env=_clean_env(**OVERRIDES)).stdout
    for name, value in OVERRIDES.items():
        assert f"{name}='{value}'" in dry  # the build's environment
        assert f"--build-arg {name}='{value}'" in dry  # the image's build args


def test_plain_build_without_git_reports_dev_unknown(tmp_path: Path) -> None:
    """A wheel built from a tree with no git and no metadata bakes dev/unknown and builds fine."""
    src = tmp_path / "src"
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md"):
        src.mkdir(exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache", "_build_info.py")
    for name in ("opensandbox_ingress", "twisted"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
        env=_clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )
    (wheel,) = tmp_path.glob("opensandbox_ingress-*.whl")
    with zipfile.ZipFile(wheel) as z:
        baked = _baked(z.read(BUILD_INFO).decode())
    assert baked == {"VERSION": "dev", "GIT_COMMIT": "unknown", "BUILD_TIME": "unknown"}


def _dry_run(fake_bin: Path, *args: str, **env: str) -> list[list[str]]:
    """`build.sh ARGS` with a `docker` that fails if called; the printed commands, split."""
    proc = subprocess.run(
        ["bash", str(REPO / "build.sh"), *args],
        cwd="/",
        env=_clean_env(PATH=f"{_fake_docker(fake_bin)}:{os.environ['PATH']}", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "docker was called" not in proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _fake_docker(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    docker = directory / "docker"
    docker.write_text("#!/bin/sh\necho 'docker was called' >&2\nexit 99\n")
    docker.chmod(0o755)
    return directory


def _buildx_build(commands: list[list[str]]) -> list[str]:
    (build,) = [c for c in commands if c[:3] == ["docker", "buildx", "build"]]
    return build


def _options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_build_sh_dry_run_prints_the_multiarch_push(how: str, tmp_path: Path) -> None:
    """`build.sh --dry-run` (or DRY_RUN=1) prints one buildx build: both platforms, the tag, the args, --push."""
    env = {"TAG": "t-123", **OVERRIDES}
    if how == "flag":
        commands = _dry_run(tmp_path, "--dry-run", **env)
    else:
        commands = _dry_run(tmp_path, DRY_RUN="1", **env)
    build = _buildx_build(commands)
    assert _options(build, "--platform") == ["linux/amd64,linux/arm64"]
    assert _options(build, "-t") == ["opensandbox/ingress:t-123"]
    assert _options(build, "--build-arg") == [f"{k}={v}" for k, v in OVERRIDES.items()]
    assert "--push" in build
    assert build[-1] == "."


def test_build_sh_defaults_come_from_git(tmp_path: Path) -> None:
    """Without the variables build.sh uses git describe, HEAD, the UTC time and tag latest."""
    head = _git("rev-parse", "HEAD")
    assert head is not None, "the tests run from a git checkout with git installed"
    build = _buildx_build(_dry_run(tmp_path, "--dry-run"))
    args = dict(a.split("=", 1) for a in _options(build, "--build-arg"))
    assert args["GIT_COMMIT"] in (head, _git("rev-parse", "HEAD"))
    assert args["VERSION"]
    assert BUILD_TIME_RE.match(args["BUILD_TIME"]), args
    assert _options(build, "-t") == ["opensandbox/ingress:latest"]


def test_build_sh_usage() -> None:
    """--help prints the usage; an unknown argument exits 2 with it on stderr."""
    ok = subprocess.run(["bash", str(REPO / "build.sh"), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "Usage: build.sh" in ok.stdout
    bad = subprocess.run(["bash", str(REPO / "build.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Usage: build.sh" in bad.stderr


def test_make_lint_passes() -> None:
    """`make lint` (ruff + mypy) passes."""
    _make("lint", env=_clean_env(), timeout=180)


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuations joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in dockerfile.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(ins.upper(), rest.strip()) for ins, _, rest in (x.partition(" ") for x in logical)]


def test_dockerfile_final_stage() -> None:
    """The final stage wires the build args to buildinfo's ENV names, runs twistd as non-root, ships no tests."""
    instructions = _instructions((REPO / "Dockerfile").read_text())
    froms = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    assert len(froms) >= 2, "expected a build stage and a final stage"
    final = instructions[froms[-1]:]
    assert re.match(r"python:3\.\d+-slim$", final[0][1]), final[0]

    args = {rest.split("=")[0] for ins, rest in final if ins == "ARG"}
    assert {"VERSION", "GIT_COMMIT", "BUILD_TIME"} <= args
    env = " ".join(rest for ins, rest in final if ins == "ENV")
    for name, arg in (
        (buildinfo.ENV_VERSION, "VERSION"),
        (buildinfo.ENV_GIT_COMMIT, "GIT_COMMIT"),
        (buildinfo.ENV_BUILD_TIME, "BUILD_TIME"),
    ):
        assert f"{name}=${{{arg}}}" in env, name

    (entrypoint,) = [rest for ins, rest in final if ins == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["twistd", "-n", "--pidfile=", "-l", "-", "opensandbox-ingress"]
    users = [rest for ins, rest in final if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")

    runs = " ".join(rest for ins, rest in final if ins == "RUN")
    assert "getPlugins" in runs, "dropin.cache is not regenerated at build"
    assert not re.search(r"apt-get|apk add|gcc|build-essential", runs)
    copied = [rest.split()[0] for ins, rest in final if ins == "COPY" and "--from" not in rest]
    assert all(not c.startswith("tests") for c in copied), copied


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    """.dockerignore drops tests, .git and stray build output, never what the Dockerfile copies."""
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", "tests", "dist", "build", BUILD_INFO} <= ignored
    sources = []
    for ins, rest in _instructions((REPO / "Dockerfile").read_text()):
        if ins == "COPY" and "--from" not in rest:
            sources += rest.split()[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert source.rstrip("/") not in ignored, source


def test_test_only_packages_are_not_runtime_dependencies() -> None:
    """treq is in the test extra, not install_requires, and nothing shipped imports it."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    runtime = parser["options"]["install_requires"].split()
    test = parser["options.extras_require"]["test"].split()
    assert "treq" not in runtime and "treq" in test
    shipped = [*(REPO / "opensandbox_ingress").rglob("*.py"), *(REPO / "twisted").rglob("*.py")]
    assert shipped
    for path in shipped:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "treq" for n in names), path
