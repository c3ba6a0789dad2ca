"""The GPU worker's kit: the wheels the lent H200 (Python 3.12, torch 2.11.0+cu130, no
network) lacks for the whole pipeline, in ``.gpu/`` (``make gpu-kit``).

    python3 bench/gpu_kit.py                  # build .gpu/ from scratch (~25 s), check it
    python3 bench/gpu_kit.py --mlflow-server  # also the full mlflow (`mlflow server` there)
    python3 bench/gpu_kit.py check            # re-check an existing .gpu/ (no downloads)
    python3 .gpu/gpu_kit.py verify            # on the device, after setup.sh installed it

The pins are ``requirements/gpu-worker.txt``; what the image holds,
``requirements/gpu-image.txt``. The build downloads each pin's cp312/abi3 manylinux x86_64
(or pure) wheel, builds the sdist-only ones and the project's own wheel, slims some wheels
(unused web apps, other CUDA versions' libraries, test folders), writes ``.gpu/setup.sh``,
copies the shared kit's baseline bench (patched) when ``../shared/gpu`` exists, checks that
every requirement of every carried wheel is carried, on the image or deliberately dropped,
prints the sizes and fails when ``.gpu`` is over its budget.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a bare interpreter: pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER_TXT = REPO / "requirements" / "gpu-worker.txt"
IMAGE_TXT = REPO / "requirements" / "gpu-image.txt"
SHARED = REPO.parent / "shared" / "gpu"
MIB = 1024 * 1024
PLATFORM = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *(
        a
        for p in (
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_24_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "manylinux1_x86_64",
            "any",
        )
        for a in ("--platform", p)
    ),
]
# The device's interpreter, for requirement markers.
DEVICE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
# Extras that carried wheels ask of image packages (the image's metadata is not here).
IMAGE_EXTRAS = {
    ("httpx", "http2"): ["h2<5,>=3"],
    ("fsspec", "http"): ["aiohttp!=4.0.0a0,!=4.0.0a1"],
}
PROJECT = "slothflow"
PROJECT_IMPORTS = [
    "slothflow.cli",
    "flows.pipeline",
    "tasks.train",
    "tasks.evaluate",
    "tasks.serve",
]


def cn(name: str) -> str:
    return canonicalize_name(name)


# ---------------------------------------------------------------- the pins file


@dataclass
class Pin:
    name: str
    version: str
    group: str
    sdist: bool = False


@dataclass
class Kit:
    pins: list[Pin] = field(default_factory=list)
    groups: dict[str, str | None] = field(default_factory=dict)  # group -> its flag or None
    drops: dict[str, str] = field(default_factory=dict)
    instead: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    image_wins: dict[str, str] = field(default_factory=dict)

    def selected(self, flags: set[str]) -> list[Pin]:
        return [p for p in self.pins if self.groups[p.group] in (None, *flags)]


def read_kit(path: Path) -> Kit:
    kit = Kit()
    group = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if m := re.fullmatch(r"# == ([\w.-]+) ==(?: \(optional: (--[\w-]+)\))?", line):
            group = m.group(1)
            kit.groups[group] = m.group(2)
        elif m := re.fullmatch(r"# drop: (\S+)\s+(.+)", line):
            kit.drops[cn(m.group(1))] = m.group(2)
        elif m := re.fullmatch(r"# instead: (\S+) -> (\S+)\s+(.+)", line):
            kit.instead.setdefault(cn(m.group(1)), []).append((cn(m.group(2)), m.group(3)))
        elif m := re.fullmatch(r"# image: (\S+)\s+(.+)", line):
            kit.image_wins[cn(m.group(1))] = m.group(2)
        elif line and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)\s*(#.*)?", line)
            if not m or group is None:
                raise SystemExit(f"{path}:{n}: expected NAME==VERSION inside a group: {raw!r}")
            kit.pins.append(Pin(m.group(1), m.group(2), group, "sdist-only" in (m.group(3) or "")))
    seen: dict[str, Pin] = {}
    for p in kit.pins:
        if cn(p.name) in seen:
            raise SystemExit(f"{path}: {p.name} pinned twice (one version of each package)")
        seen[cn(p.name)] = p
    return kit


def read_image(path: Path) -> dict[str, str | None]:
    image: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            image[cn(name)] = version or None
    return image


# ---------------------------------------------------------------- wheels


@dataclass
class Wheel:
    path: Path
    name: str  # canonical
    version: str
    requires: list[str]


def read_wheel(path: Path) -> Wheel:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        msg = Parser().parsestr(z.read(meta).decode("utf-8"))
    return Wheel(path, cn(msg["Name"]), msg["Version"], msg.get_all("Requires-Dist") or [])


def wheel_tags_ok(path: Path) -> bool:
    """cp312, abi3 (cp3x <= 3.12) or pure; manylinux x86_64 or any."""
    *_, py, abi, plat = path.name[:-4].split("-")
    pys = py.split(".")
    pure = abi == "none" and all(p in ("py3", "py2", "py312", "cp312") for p in pys)
    abi3 = abi == "abi3" and all(re.fullmatch(r"cp3(\d+)", p) and int(p[3:]) <= 12 for p in pys)
    cp312 = abi == "cp312" and pys == ["cp312"]
    plat_ok = all(p == "any" or re.fullmatch(r"manylinux[\w]*_x86_64", p) for p in plat.split("."))
    return (pure or abi3 or cp312) and plat_ok


def repack(src: Path, dst: Path, drop: Callable[[str], bool]) -> int:
    """Copy a wheel without the members ``drop`` names (RECORD rewritten to match)."""
    dropped = 0
    with (
        zipfile.ZipFile(src) as zin,
        zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout,
    ):
        for info in zin.infolist():
            if drop(info.filename):
                dropped += 1
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = data.decode().splitlines()
                data = ("\n".join(r for r in rows if not drop(r.split(",", 1)[0])) + "\n").encode()
            zout.writestr(info, data)
    return dropped


def _test_folder(member: str) -> bool:
    """A package's own test suite (``pkg/tests/``, ``pkg/test/``, a top-level ``test/``);
    ``testing/`` folders are importable helpers and stay."""
    parts = member.split("/")
    return any(p in ("tests", "test") for p in parts[:2]) and not parts[0].endswith(".dist-info")


def _bnb_other_cuda(member: str) -> bool:
    m = re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+)\.so", member)
    return bool(m) and m.group(1) not in ("cpu", "cuda130")


SLIM: dict[str, Callable[[str], bool]] = {
    # the web studio (26 MB unpacked): not imported by the library
    "unsloth": lambda m: m.startswith("studio/"),
    # bitsandbytes loads libbitsandbytes_cuda{torch.version.cuda}.so: cuda130 for the image's
    # torch (cpu stays for its CPU fallback; 12.x, 11.x, 13.2 and ROCm libraries go)
    "bitsandbytes": _bnb_other_cuda,
    # the two web UIs; create_ui_app() skips a bundle whose folder is missing
    "prefect": lambda m: m.startswith(("prefect/server/ui/", "prefect/server/ui-v2/")),
    # the UI build; the server's / answers that index.html is not there, the API works
    "mlflow": lambda m: m.startswith("mlflow/server/js/"),
    # the ~12,000 YAMLs of lm-eval's built-in tasks (lm_eval/tasks/*/); TaskManager and its
    # modules (lm_eval/tasks/*.py) stay. The project evaluates its own generated tasks
    # (include_defaults=False); a built-in task needs its Hub dataset, which the offline
    # device cannot fetch, so eval.extra_tasks there report "no such lm-eval task".
    "lm-eval": lambda m: m.startswith("lm_eval/tasks/") and m.count("/") >= 3,
}


def _without(rule: Callable[[str], bool], src: Path, other: Path) -> Callable[[str], bool]:
    """``rule``, and every file ``other`` holds byte for byte (mlflow's wheel repeats all of
    mlflow-skinny's files: carried beside mlflow-skinny, it keeps only the rest)."""
    with zipfile.ZipFile(other) as z:
        theirs = {i.filename: i.CRC for i in z.infolist() if ".dist-info/" not in i.filename}
    with zipfile.ZipFile(src) as z:
        same = {i.filename for i in z.infolist() if theirs.get(i.filename) == i.CRC}
    return lambda m: m in same or rule(m)


def slim_rule(name: str) -> Callable[[str], bool]:
    own = SLIM.get(name)
    return (lambda m: own(m) or _test_folder(m)) if own else _test_folder


def pip(*args: str, cwd: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")


def fetch(pins: list[Pin], raw: Path, jobs: int = 8) -> None:
    """Binary wheels in ``jobs`` parallel pip calls; sdist-only pins built here."""
    binary = [f"{p.name}=={p.version}" for p in pins if not p.sdist]
    chunks = [binary[i::jobs] for i in range(jobs) if binary[i::jobs]]
    calls = [["download", "-q", "--no-deps", *PLATFORM, "-d", str(raw), *c] for c in chunks]
    # pure-Python packages published only as sdists: the wheel built here runs on 3.12 too
    calls += [
        ["wheel", "-q", "--no-deps", "-w", str(raw), f"{p.name}=={p.version}"]
        for p in pins
        if p.sdist
    ]
    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(lambda c: pip(*c), calls))


def build_project(raw: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # a copy of the tracked tree: the build's build/ and egg-info stay out of the checkout
        src = Path(tmp) / "src"
        for rel in tracked_files():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
        pip("wheel", "-q", "--no-deps", "-w", str(raw), str(src))


# ---------------------------------------------------------------- the resolution check


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    image_checks: list[str] = field(default_factory=list)  # constraints on unknown versions
    dropped: dict[str, set[str]] = field(default_factory=dict)
    replaced: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    overridden: dict[str, set[str]] = field(default_factory=dict)
    unrequired: list[str] = field(default_factory=list)


def active(req: Requirement, extras: set[str], env: dict[str, str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in ({""} | extras))


def resolve(
    carried: dict[str, tuple[str, list[str]]],
    installed: Callable[[str], str | None],
    kit: Kit,
    roots: dict[str, set[str]],
    env: dict[str, str],
    on_image: Callable[[str], bool],
) -> Report:
    """Walk every requirement of every carried distribution (with the extras some carried
    distribution asks of it). ``installed(name)`` gives an image package's version, or None
    where it is on the image at an unknown version (build side)."""
    rep = Report()
    extras: dict[str, set[str]] = {n: set(roots.get(n, ())) for n in carried}
    required: set[str] = set()
    done: dict[str, set[str]] = {}
    todo = list(carried)
    while todo:
        name = todo.pop()
        if done.get(name) == extras[name]:
            continue
        done[name] = set(extras[name])
        version, reqs = carried[name]
        for spec in reqs:
            req = Requirement(spec)
            if not active(req, extras[name], env):
                continue
            dep = cn(req.name)
            by = f"{name} {version}"
            if dep in carried:
                required.add(dep)
                have = carried[dep][0]
                if not req.specifier.contains(have, prereleases=True):
                    rep.problems.append(f"{dep} {have} (carried) does not meet {req} <- {by}")
                if not req.extras <= extras[dep]:
                    extras[dep] |= req.extras
                    todo.append(dep)
            elif other := next((o for o, _ in kit.instead.get(dep, []) if o in carried), None):
                required.add(other)
                rep.replaced.setdefault((dep, other), set()).add(name)
                if not req.specifier.contains(carried[other][0], prereleases=True):
                    rep.problems.append(f"{other} {carried[other][0]} does not meet {req} <- {by}")
            elif on_image(dep):
                have_img = installed(dep)
                if have_img is None:
                    if req.specifier:
                        rep.image_checks.append(f"{dep}{req.specifier} <- {name}")
                elif req.specifier.contains(have_img, prereleases=True):
                    pass
                elif dep in kit.image_wins:
                    rep.overridden.setdefault(f"{dep} {have_img}", set()).add(f"{req} <- {name}")
                else:
                    rep.problems.append(f"{dep} {have_img} (image) does not meet {req} <- {by}")
                for e in sorted(req.extras):
                    if (dep, e) not in IMAGE_EXTRAS:
                        rep.problems.append(
                            f"{dep}[{e}] <- {by}: add its requirements to IMAGE_EXTRAS"
                        )
                        continue
                    for sub in IMAGE_EXTRAS[(dep, e)]:
                        s = cn(Requirement(sub).name)
                        if s in carried:
                            required.add(s)
                        elif not on_image(s):
                            rep.problems.append(f"{s} (for {dep}[{e}] <- {name}) is missing")
            elif dep in kit.drops:
                rep.dropped.setdefault(dep, set()).add(name)
            else:
                rep.problems.append(f"{req} <- {by}: MISSING (not carried, not on the image)")
    rep.unrequired = sorted(n for n in carried if n not in required and n not in roots)
    return rep


def build_side_check(wheels: list[Wheel], kit: Kit, image: dict[str, str | None]) -> Report:
    carried = {w.name: (w.version, w.requires) for w in wheels}
    roots = {PROJECT: {"gpu"}}
    rep = resolve(
        carried,
        lambda n: image.get(n),
        kit,
        roots,
        DEVICE_ENV,
        lambda n: n in image,
    )
    for w in wheels:
        if w.name in image:
            rep.problems.append(f"{w.name} is on the image: do not carry it")
        if not wheel_tags_ok(w.path):
            rep.problems.append(f"{w.path.name}: not a cp312/abi3/pure manylinux x86_64 wheel")
    names = [w.name for w in wheels]
    for n in sorted({n for n in names if names.count(n) > 1}):
        rep.problems.append(f"{n}: more than one wheel")
    return rep


# ---------------------------------------------------------------- setup.sh

SETUP_SH = r"""#!/bin/bash
# Written by bench/gpu_kit.py (make gpu-kit); do not edit. On the GPU device, from the
# checkout's root:   source .gpu/setup.sh
# Installs the carried wheels into /tmp/site (once per warm machine, again when the kit
# changes), sets an offline environment, checks requirements and imports (one line each).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# The checkout first: the project finds its recipes (configs/) beside its packages, so its
# code runs from the checkout; the project's wheel in /tmp/site gives the `slothflow`
# command and its metadata. /tmp/site/bin has the prefect, mlflow and lm-eval commands.
export PYTHONPATH=$root:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache
# no telemetry calls from Prefect or MLflow (nothing outside answers there)
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
# MLflow 3.17 refuses a file: tracking store unless this is set (sqlite:/// works too:
# mlflow-skinny's SQLAlchemy store runs on the SQLAlchemy and alembic carried for Prefect)
export MLFLOW_ALLOW_FILE_STORE=true
if [ "$(cat /tmp/site/.kit 2>/dev/null)" != "@KIT_ID@" ]; then
  rm -rf /tmp/site
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --disable-pip-version-check --target /tmp/site "$here"/whl/*.whl \
    || { echo "setup: wheel install failed"; return 1 2>/dev/null || exit 1; }
  echo "@KIT_ID@" > /tmp/site/.kit
fi
python3 "$here/gpu_kit.py" verify --site /tmp/site --pins "$here/gpu-worker.txt" 2>&1 | tail -1
python3 -c "
import importlib.metadata as md
import unsloth, torch, prefect, mlflow, lm_eval, @PROJECT_IMPORTS@
print('setup ok: torch', torch.__version__, 'unsloth', unsloth.__version__, 'prefect', prefect.__version__,
      'mlflow', mlflow.__version__, 'lm_eval', md.version('lm_eval'), '@PROJECT@', md.version('@PROJECT@'),
      'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
" 2>&1 | tail -1
"""


def kit_id(whl: Path) -> str:
    h = hashlib.sha256()
    for w in sorted(whl.glob("*.whl")):
        h.update(w.name.encode() + str(w.stat().st_size).encode())
    return h.hexdigest()[:16]


def write_setup(gpu: Path) -> None:
    text = (
        SETUP_SH.replace("@KIT_ID@", kit_id(gpu / "whl"))
        .replace("@PROJECT_IMPORTS@", ", ".join(PROJECT_IMPORTS))
        .replace("@PROJECT@", PROJECT)
    )
    (gpu / "setup.sh").write_text(text)
    (gpu / "setup.sh").chmod(0o755)
    shutil.copy2(__file__, gpu / "gpu_kit.py")
    shutil.copy2(WORKER_TXT, gpu / "gpu-worker.txt")


def copy_baseline(gpu: Path) -> str:
    src = SHARED / "baseline_bench.py"
    if not src.is_file():
        return f"no {src}: baseline_bench.py not copied"
    shutil.copyfile(src, gpu / "baseline_bench.py")
    patch = REPO / "bench" / "baseline_bench.patch"
    r = subprocess.run(
        ["patch", "-s", "-p1", "-d", str(gpu), "-i", str(patch)], capture_output=True, text=True
    )
    if r.returncode:
        raise SystemExit(f"bench/baseline_bench.patch does not apply: {r.stdout}{r.stderr}")
    return "baseline_bench.py copied from ../shared/gpu, bench/baseline_bench.patch applied"


# ---------------------------------------------------------------- sizes


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tracked_files() -> list[str]:
    """The checkout's files that travel to the device: tracked, and untracked but not
    ignored (what the device tool sends)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return [f.decode() for f in out if f and (REPO / f.decode()).is_file()]


def repo_bytes() -> int:
    return sum((REPO / rel).stat().st_size for rel in tracked_files())


def size_table(gpu: Path, kit: Kit, wheels: list[Wheel]) -> tuple[int, str]:
    group_of = {cn(p.name): p.group for p in kit.pins} | {PROJECT: "project"}
    sizes: dict[str, tuple[int, int]] = {}
    for w in wheels:
        g = group_of.get(w.name, "?")
        n, b = sizes.get(g, (0, 0))
        sizes[g] = (n + 1, b + w.path.stat().st_size)
    total = tree_bytes(gpu)
    rest = total - sum(b for _, b in sizes.values())
    lines = ["| group | wheels | MiB |", "| --- | ---: | ---: |"]
    order = [*kit.groups, "project", "?"]
    lines += [
        f"| {g} | {n} | {b / MIB:.1f} |"
        for g, (n, b) in sorted(sizes.items(), key=lambda kv: order.index(kv[0]))
    ]
    lines.append(
        f"| setup.sh, gpu_kit.py, gpu-worker.txt, baseline_bench.py | - | {rest / MIB:.2f} |"
    )
    lines.append(f"| **.gpu total** | {len(wheels)} | **{total / MIB:.1f}** |")
    return total, "\n".join(lines)


# ---------------------------------------------------------------- commands


def print_report(rep: Report, kit: Kit) -> None:
    for dep, by in sorted(rep.dropped.items()):
        print(f"  dropped  {dep} (required by {', '.join(sorted(by))}): {kit.drops[dep]}")
    for (dep, other), by in sorted(rep.replaced.items()):
        reason = dict(kit.instead[dep])[other]
        print(f"  instead  {dep} -> {other} (for {', '.join(sorted(by))}): {reason}")
    for dep, by in sorted(rep.overridden.items()):
        reason = kit.image_wins[cn(dep.split()[0])]
        print(f"  image's  {dep} instead of {', '.join(sorted(by))}: {reason}")
    for name in sorted(set(kit.drops) - set(rep.dropped)):
        print(f"  note: drop entry {name} is required by no carried wheel")
    if rep.unrequired:
        print(f"  carried, required by no carried wheel: {', '.join(rep.unrequired)}")
    if rep.image_checks:
        print(
            f"  {len(rep.image_checks)} constraints on image packages of unknown version "
            "(.gpu/image-constraints.txt; setup.sh's verify checks them on the device)"
        )
    for p in rep.problems:
        print(f"  PROBLEM  {p}")


def check(gpu: Path, kit: Kit, flags: set[str], budget: float, total_budget: float) -> int:
    image = read_image(IMAGE_TXT)
    wheels = [read_wheel(w) for w in sorted((gpu / "whl").glob("*.whl"))]
    by_name = {w.name: w for w in wheels}
    problems = []
    for p in kit.selected(flags):
        w = by_name.get(cn(p.name))
        if w is None:
            problems.append(f"{p.name}=={p.version}: no wheel in {gpu / 'whl'}")
        elif Version(w.version) != Version(p.version):
            problems.append(f"{p.name}: wheel {w.version}, pinned {p.version}")
    expected = {cn(p.name) for p in kit.selected(flags)} | {PROJECT}
    problems += [
        f"{w.path.name}: not pinned in gpu-worker.txt" for w in wheels if w.name not in expected
    ]
    rep = build_side_check(wheels, kit, image)
    rep.problems[:0] = problems
    (gpu / "image-constraints.txt").write_text("\n".join(sorted(rep.image_checks)) + "\n")
    print(f"resolution check over {len(wheels)} carried wheels (Python 3.12, linux x86_64):")
    print_report(rep, kit)
    total, table = size_table(gpu, kit, wheels)
    repo = repo_bytes()
    print()
    print(table)
    print(
        f"\n.gpu {total / MIB:.1f} MiB (budget {budget:g}); with the checkout's "
        f"{repo / MIB:.1f} MiB the carried tree is {(total + repo) / MIB:.1f} MiB "
        f"(limit {total_budget:g})"
    )
    bad = bool(rep.problems)
    if total > budget * MIB or total + repo > total_budget * MIB:
        print("FAIL: over budget")
        bad = True
    print("gpu-kit: FAILED" if bad else "gpu-kit: ok")
    return 1 if bad else 0


def build(args: argparse.Namespace) -> int:
    kit = read_kit(WORKER_TXT)
    flags = {"--mlflow-server"} if args.mlflow_server else set()
    gpu = args.out
    if gpu.exists():
        shutil.rmtree(gpu)
    (gpu / "whl").mkdir(parents=True)
    pins = kit.selected(flags)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        print(f"downloading {len(pins)} pinned wheels (+ building sdist-only ones, the project)")
        with ThreadPoolExecutor(2) as ex:
            jobs = [ex.submit(fetch, pins, raw), ex.submit(build_project, raw)]
            for j in jobs:
                j.result()
        wheels = {read_wheel(w).name: w for w in raw.glob("*.whl")}
        if len(wheels) != len(list(raw.glob("*.whl"))):
            raise SystemExit(f"more than one wheel of a package in {sorted(raw.iterdir())}")
        for name, w in sorted(wheels.items()):
            rule = slim_rule(name)
            if name == "mlflow" and "mlflow-skinny" in wheels:
                rule = _without(rule, w, wheels["mlflow-skinny"])
            dropped = repack(w, gpu / "whl" / w.name, rule)
            if dropped and name in SLIM:
                before, after = w.stat().st_size, (gpu / "whl" / w.name).stat().st_size
                print(
                    f"  slimmed {w.name}: {dropped} files, {before / MIB:.1f} -> {after / MIB:.1f} MiB"
                )
        others = sorted(set(raw.iterdir()) - set(raw.glob("*.whl")))
        if others:
            raise SystemExit(f"not wheels: {[o.name for o in others]}")
    write_setup(gpu)
    print(copy_baseline(gpu))
    return check(gpu, kit, flags, args.budget_mib, args.total_mib)


def verify(args: argparse.Namespace) -> int:
    """On the device: the carried distributions' requirements against what is installed."""
    import importlib.metadata as md

    kit = read_kit(args.pins)
    carried: dict[str, tuple[str, list[str]]] = {}
    for d in md.distributions(path=[str(args.site)]):
        carried[cn(d.metadata["Name"])] = (d.version, d.requires or [])

    def installed(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    def on_image(name: str) -> bool:
        return installed(name) is not None

    rep = resolve(carried, installed, kit, {PROJECT: {"gpu"}}, _default_env(), on_image)
    if rep.problems:
        (args.site / ".deps-unmet.txt").write_text("\n".join(rep.problems) + "\n")
        more = f" | ... {len(rep.problems) - 8} more" if len(rep.problems) > 8 else ""
        print(
            f"deps: {len(rep.problems)} unmet (all in {args.site}/.deps-unmet.txt): "
            + " | ".join(rep.problems[:8])
            + more
        )
        return 1
    print(f"deps ok: the {len(carried)} carried distributions' requirements are met here")
    return 0


def _default_env() -> dict[str, str]:
    import platform

    return {
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "python_full_version": platform.python_version(),
        "implementation_name": sys.implementation.name,
        "platform_python_implementation": platform.python_implementation(),
        "sys_platform": sys.platform,
        "platform_system": platform.system(),
        "platform_machine": platform.machine(),
        "os_name": os.name,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", nargs="?", default="build", choices=["build", "check", "verify"])
    ap.add_argument("--out", type=Path, default=REPO / ".gpu")
    ap.add_argument("--mlflow-server", action="store_true", help="carry the full mlflow too")
    ap.add_argument("--budget-mib", type=float, default=58.0, help=".gpu's budget")
    ap.add_argument("--total-mib", type=float, default=64.0, help="checkout + .gpu limit")
    ap.add_argument("--site", type=Path, default=Path("/tmp/site"), help="verify: the target")
    ap.add_argument("--pins", type=Path, default=WORKER_TXT, help="verify: gpu-worker.txt")
    args = ap.parse_args()
    if args.command == "build":
        return build(args)
    if args.command == "verify":
        return verify(args)
    flags = {"--mlflow-server"} if args.mlflow_server else set()
    return check(args.out, read_kit(WORKER_TXT), flags, args.budget_mib, args.total_mib)


if __name__ == "__main__":
    sys.exit(main())
