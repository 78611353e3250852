"""Build of lowbit_engine._C: C++ CPU references always; CUDA kernels when nvcc is found.

Environment:
  LOWBIT_CUDA=0|1         force CUDA off / on (default: on when nvcc is found)
  LOWBIT_CUDA_ARCHS       semicolon list of archs, default "90a" (e.g. "90a;80")
  LOWBIT_NVCC_THREADS     nvcc --threads value (default 2)

The .cu files are compiled by nvcc into objects that are linked into the one pybind11 module together
with the static CUDA runtime, so the module needs no libcudart on the library path and no torch headers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _cuda_home(nvcc: str) -> Path:
    """The toolkit root that holds lib64/libcudart_static.a (nvcc may be a wrapper script on PATH)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    try:  # ask nvcc itself: `nvcc --dryrun` prints the TOP of its installation
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
        for line in out.splitlines():
            if "TOP=" in line:
                candidates.append(line.split("TOP=", 1)[1].strip())
    except OSError:
        pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "lib64" / "libcudart_static.a").exists():
            return Path(c)
    raise RuntimeError(f"lowbit-engine: found nvcc at {nvcc} but no lib64/libcudart_static.a near it; "
                       "set CUDA_HOME or LOWBIT_CUDA=0")


def _cuda_wanted() -> tuple[bool, str | None]:
    flag = os.environ.get("LOWBIT_CUDA", "").strip()
    nvcc = _find_nvcc()
    if flag == "0":
        return False, None
    if flag == "1" and nvcc is None:
        raise RuntimeError("LOWBIT_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    return nvcc is not None, nvcc


def _archs() -> list[str]:
    raw = os.environ.get("LOWBIT_CUDA_ARCHS", "90a")
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs:
        raise RuntimeError("LOWBIT_CUDA_ARCHS is empty")
    return archs


class BuildWithCuda(build_ext):
    """build_ext that first compiles csrc/cuda/*.cu with nvcc and links the objects in."""

    def build_extensions(self) -> None:
        use_cuda, nvcc = _cuda_wanted()
        ext = self.extensions[0]
        if use_cuda and not any((CSRC / "cuda").glob("*.cu")):
            use_cuda = False  # nothing to compile: the bindings would reference missing launchers
        if use_cuda:
            archs = _archs()
            objects = self._compile_cuda(nvcc, archs)
            home = _cuda_home(nvcc)
            ext.extra_objects += objects
            ext.sources.append("csrc/bindings/bind_cuda.cpp")  # setuptools wants paths relative to setup.py
            ext.define_macros += [("LOWBIT_WITH_CUDA", "1"), ("LOWBIT_CUDA_ARCHS", f'"{";".join(archs)}"')]
            ext.library_dirs.append(str(home / "lib64"))
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
            print(f"lowbit-engine: CUDA kernels built for {archs} with {nvcc}")
        else:
            print("lowbit-engine: building the CPU reference only (no nvcc, or LOWBIT_CUDA=0)")
        super().build_extensions()

    def _compile_cuda(self, nvcc: str, archs: list[str]) -> list[str]:
        sources = sorted((CSRC / "cuda").glob("*.cu"))
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        # The host code may launch the wgmma kernels only when their sm_90a machine code is in the build.
        defines = ["-DLOWBIT_HAVE_SM90A"] if "90a" in archs else []
        objects = []
        for src in sources:
            obj = out_dir / (src.stem + ".o")
            cmd = [nvcc, "-std=c++17", "-O3", f"-I{CSRC / 'include'}", "-Xcompiler", "-fPIC",
                   "--threads", os.environ.get("LOWBIT_NVCC_THREADS", "2"), *defines, *gencode, "-c", str(src),
                   "-o", str(obj)]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(str(obj))
        return objects


ext = Pybind11Extension(
    "lowbit_engine._C",
    sources=[str(p.relative_to(ROOT)) for p in sorted((CSRC / "cpu").glob("*.cpp"))]
    + ["csrc/bindings/module.cpp", "csrc/bindings/bind_cpu.cpp"],
    include_dirs=[str(CSRC / "include")],
    cxx_std=17,
    # -ffp-contract=off: no fused multiply-adds, so fp32 results stay bit-exact with torch's
    extra_compile_args=["-O3", "-ffp-contract=off"],
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithCuda},
    packages=["lowbit_engine", "lowbit_engine.formats", "lowbit_engine.kernels"],
    package_dir={"lowbit_engine.kernels": "kernels"},
)
