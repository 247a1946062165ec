"""Build the wheel bundle a GPU machine without a package index needs to run flair-fl.

python scripts/gpu_bundle.py                 # .gpu_bundle/py3.12: Python 3.12, manylinux x86_64
python scripts/gpu_bundle.py --python 3.11   # for this machine's Python (the bundle test)

The GPU machine has Python with torch, torchvision and h5py (and what those depend on:
numpy, pillow, sympy, ...). Everything else a run and the GPU check import travels as
wheels, pinned to the versions installed here: flwr with Ray, hydra-core, omegaconf,
opacus, pytest, tqdm and their dependencies that the base lacks, from this environment's
package metadata, less `LEFT_OUT` (each with the reason). Ray's wheel is repacked without
what flwr's simulation never imports (`RAY_DROP`) and with its native binaries stripped of
symbols. Downloads are cached in `--cache`; the bundle folder holds only the wheels and
manifest.json. Install there with
`pip install --no-index --no-deps --target DIR BUNDLE/*.whl`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

BASE = ("torch", "torchvision", "h5py")  # on the GPU machine already
ROOTS = (
    "flwr[simulation]",
    "hydra-core",
    "omegaconf",
    "opacus",
    "pytest",
    "pytest-timeout",
    "tqdm",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# Found by recording every module each process of a `debug=tiny` run imported (driver, Ray
# workers, Ray's agents and monitors): these parts of Ray's wheel are never imported.
RAY_DROP = (
    "ray/jars/",
    "ray/dashboard/client/build/",
    "ray/rllib/",
    "ray/serve/",
    "ray/data/",
    "ray/tune/",
    "ray/train/",
    "ray/llm/",
    "ray/air/",
    "ray/workflow/",
)
RAY_STRIP = ("ray/_raylet.so", "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server")
# Required by the metadata, but not imported by a run with the plots logger off (the GPU
# check runs `~logger.plots`), nor by the GPU-marked tests.
LEFT_OUT = {
    "uv": "flwr's app-packaging CLI; the simulation never calls it (a 20 MB binary)",
    "scipy": "opacus' accountants import it: DP-SGD needs it, the GPU check runs none (36 MB)",
    "uvloop": "Ray uses it if present, asyncio otherwise (4 MB)",
    "uvicorn": "flwr's HTTP servers (SuperLink/SuperExec); the simulation starts none",
    "httptools": "uvicorn[standard]",
    "watchfiles": "uvicorn[standard]",
    "websockets": "uvicorn[standard]",
    "python-dotenv": "uvicorn[standard]",
    "greenlet": "sqlalchemy[asyncio]; flwr's simulation uses no async database",
    "tzdata": "time zones for platforms without them; Linux has its own",
}
# What travels with the working tree: 64 MiB in all, the repository (~1.2 MiB) included.
BUDGET_MIB = 62


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _environment(python: str, extra: str = "") -> dict[str, str]:
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": extra,
    }


def closure(roots: Iterable[str], python: str) -> dict[str, str]:
    """{normalised name: installed version} of `roots` and everything they require (for
    `python` on Linux x86_64), from the installed packages' metadata."""
    found: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} is not installed here; run `make setup` first") from None
        if name in found and not req.extras:
            continue
        found[name] = dist.version
        envs = [_environment(python, e) for e in ("", *req.extras)]
        for line in dist.requires or []:
            dep = Requirement(line)
            wanted = dep.marker is None or any(dep.marker.evaluate(env) for env in envs)
            if wanted and (_norm(dep.name) not in found or dep.extras):
                todo.append(dep)
    return found


def to_bundle(python: str) -> dict[str, str]:
    """What must travel: the roots' closure less the base's and `LEFT_OUT`."""
    skip = set(closure(BASE, python)) | set(LEFT_OUT)
    return {n: v for n, v in sorted(closure(ROOTS, python).items()) if n not in skip}


def _pip(*args: str) -> bool:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--quiet"]).returncode == 0


def download(packages: dict[str, str], cache: Path, python: str) -> list[Path]:
    """The target's wheels of `packages`, from `cache` or the package index; a package
    with no wheel (a pure Python sdist such as hydra's antlr4 runtime) is built here."""
    abi = "cp" + python.replace(".", "")
    flags = ["--no-deps", "--only-binary=:all:", "--dest", str(cache), "--python-version"]
    flags += [python, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for platform in ("any", *PLATFORMS):
        flags += ["--platform", platform]
    cache.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, version in packages.items():
        found = _cached(cache, name, version)
        if found is None and not _pip("download", *flags, f"{name}=={version}"):
            _pip("wheel", "--no-deps", "--wheel-dir", str(cache), f"{name}=={version}")
        found = found or _cached(cache, name, version)
        if found is None:
            raise SystemExit(f"no wheel for {name}=={version} (Python {python})")
        wheels.append(found)
    return wheels


def _cached(cache: Path, name: str, version: str) -> Path | None:
    for wheel in cache.glob("*.whl"):
        dist, ver = wheel.name.split("-")[:2]
        if _norm(dist) == name and ver == version:
            return wheel
    return None


def trim_ray(wheel: Path, out: Path) -> Path:
    """Ray's wheel repacked into `out` without `RAY_DROP`, `RAY_STRIP` stripped of symbols,
    its RECORD rewritten to match (pip checks nothing else)."""
    target = out / wheel.name
    with (
        zipfile.ZipFile(wheel) as src,
        zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst,
        tempfile.TemporaryDirectory() as tmp,
    ):
        kept = [i for i in src.infolist() if not i.filename.startswith(RAY_DROP)]
        names = {i.filename for i in kept}
        for info in kept:
            data = src.read(info)
            if info.filename in RAY_STRIP:
                binary = Path(tmp) / "binary"
                binary.write_bytes(data)
                subprocess.run(["strip", "--strip-unneeded", str(binary)], check=True)
                data = binary.read_bytes()
            if info.filename.endswith(".dist-info/RECORD"):
                rows = data.decode().splitlines()
                data = "".join(_record_row(r, names) for r in rows).encode()
            dst.writestr(info, data)
    return target


def _record_row(row: str, names: set[str]) -> str:
    """A RECORD row of a kept file; the stripped binaries lose their hash and size (pip
    installs a file whose RECORD row has none)."""
    path = row.split(",")[0]
    if path not in names:
        return ""
    return f"{path},,\n" if path in RAY_STRIP else row + "\n"


def build(out: Path, cache: Path, python: str) -> dict[str, object]:
    """The bundle in `out` (its old wheels removed); returns its manifest (also manifest.json)."""
    if shutil.which("strip") is None:
        raise SystemExit("`strip` (binutils) is needed to shrink Ray's binaries")
    packages = to_bundle(python)
    wheels = download(packages, cache, python)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    for wheel in wheels:
        if wheel.name.startswith("ray-"):
            ray = (wheel.stat().st_size, trim_ray(wheel, out).stat().st_size)
        else:
            shutil.copy2(wheel, out / wheel.name)
    sizes = {w.name: w.stat().st_size for w in sorted(out.glob("*.whl"))}
    manifest: dict[str, object] = {
        "python": python,
        "platforms": list(PLATFORMS),
        "base": list(BASE),
        "packages": packages,
        "left_out": LEFT_OUT,
        "ray_dropped": list(RAY_DROP),
        "ray_bytes_before_after": list(ray),
        "wheels": sizes,
        "total_mib": round(sum(sizes.values()) / 2**20, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="target Python (default: 3.12)")
    parser.add_argument("--out", type=Path, help="bundle folder (default: .gpu_bundle/pyX.Y)")
    parser.add_argument("--cache", type=Path, help="downloads (default: .gpu_bundle/cache/pyX.Y)")
    args = parser.parse_args(argv)
    root = Path(".gpu_bundle")
    out = args.out or root / f"py{args.python}"
    manifest = build(out, args.cache or root / "cache" / f"py{args.python}", args.python)
    before, after = (int(n) for n in manifest["ray_bytes_before_after"])  # type: ignore[attr-defined]
    total = float(manifest["total_mib"])  # type: ignore[arg-type]
    print(
        f"{len(manifest['wheels'])} wheels, {total} MiB in {out} "  # type: ignore[arg-type]
        f"(ray {before / 2**20:.0f} -> {after / 2**20:.0f} MiB)"
    )
    if total > BUDGET_MIB:
        print(f"flair-fl: the bundle exceeds {BUDGET_MIB} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
