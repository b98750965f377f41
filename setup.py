"""Build nm_optim._C with CMake + Ninja; everything else is plain setuptools (pyproject.toml).

Environment variables:
  NM_OPTIM_CUDA=0|1         force the CUDA kernel off / on (default: on when nvcc is found)
  NM_OPTIM_CUDA_ARCHS=...   CMake CUDA architectures (default "80-real;90": sm_80, sm_90 + PTX)
  NM_OPTIM_NATIVE=1         -march=native for the CPU kernel (not portable)
  NM_OPTIM_DEBUG=1          -O0 -g
  NM_OPTIM_LTO=0            link without pybind11's link-time optimisation (-flto=auto), whose
                            link of the CPU kernel runs on about one core: a faster build for
                            bench/gpu_check.sh (the kernels are compiled with the same flags)
  CMAKE_BUILD_PARALLEL_LEVEL  build jobs
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _cmake_bool(name: str) -> str:
    return "ON" if os.environ.get(name, "0").lower() in ("1", "on", "true", "yes") else "OFF"


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("NM_OPTIM_CUDA", "AUTO")
        if cuda.upper() in ("AUTO", "") and shutil.which("nvcc") is None and "CUDACXX" not in os.environ:
            # CMake's check_language also looks in /usr/local/cuda; say what we saw first.
            print("nm_optim: nvcc not on PATH; CMake will look in the default CUDA locations", flush=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DNM_OPTIM_CUDA={cuda}",
            f"-DNM_OPTIM_NATIVE={_cmake_bool('NM_OPTIM_NATIVE')}",
            f"-DNM_OPTIM_DEBUG={_cmake_bool('NM_OPTIM_DEBUG')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        # pybind11_add_module adds its LTO flags only while CMAKE_INTERPROCEDURAL_OPTIMIZATION is
        # undefined: OFF turns them off, -U forgets an OFF left in the build folder's cache.
        if os.environ.get("NM_OPTIM_LTO", "1").lower() in ("0", "off", "false", "no"):
            args.append("-DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF")
        else:
            args.append("-UCMAKE_INTERPROCEDURAL_OPTIMIZATION")
        if os.environ.get("NM_OPTIM_CUDA_ARCHS"):
            args.append(f"-DNM_OPTIM_CUDA_ARCHS={os.environ['NM_OPTIM_CUDA_ARCHS']}")
        if shutil.which("ninja") or _has_ninja_module():
            args += ["-G", "Ninja"]
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir)], check=True)


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


setup(ext_modules=[CMakeExtension("nm_optim._C")], cmdclass={"build_ext": CMakeBuild})
