"""Build `vigor_kernels._C` with CMake + ninja + pybind11.

`pip install -e .` runs this. Environment knobs:
  VIGOR_WITH_CUDA=0       skip the CUDA kernels even when nvcc is found
  VIGOR_CUDA_ARCHS="90"   CUDA architectures to compile for (default "80;90")
  VIGOR_BUILD_JOBS=N      parallel compile jobs (default: all cores)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            "cmake",
            str(ROOT),
            "-G",
            "Ninja",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        if os.environ.get("VIGOR_WITH_CUDA", "1") in ("0", "false", "OFF", "off"):
            args.append("-DVIGOR_WITH_CUDA=OFF")
        if archs := os.environ.get("VIGOR_CUDA_ARCHS"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        subprocess.run(args, cwd=build_dir, check=True)
        jobs = os.environ.get("VIGOR_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("vigor_kernels._C")], cmdclass={"build_ext": CMakeBuild})
