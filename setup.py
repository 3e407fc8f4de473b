"""Build of msattn's extension, msattn._C.

The C11 kernels (csrc/cpu/*.c) are compiled by the C compiler with C flags, then linked with the
ATen glue (csrc/torch/*.cpp), which torch.utils.cpp_extension compiles as C++. CUDA sources
(csrc/cuda/*.cu and the *_cuda.cpp glue) are added when nvcc and a CUDA build of torch are present;
MSATTN_CUDA=0/1 forces the choice; MSATTN_SANITIZE=1 adds AddressSanitizer and UBSan (make test-asan).
Install with `pip install --no-build-isolation .` against the torch already in the environment.
"""

import glob
import os

from setuptools import find_packages, setup
from setuptools._distutils.ccompiler import new_compiler
from setuptools._distutils.sysconfig import customize_compiler
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
C_SOURCES = sorted(glob.glob("csrc/cpu/*.c"))
GLUE = sorted(glob.glob("csrc/torch/*.cpp"))
CPU_GLUE = [s for s in GLUE if not s.endswith("_cuda.cpp")]
CUDA_GLUE = [s for s in GLUE if s.endswith("_cuda.cpp")]
CU_SOURCES = sorted(glob.glob("csrc/cuda/*.cu"))
DEBUG = os.environ.get("MSATTN_DEBUG", "0") == "1"
OPT = ["-O0", "-g"] if DEBUG else ["-O3"]
C_FLAGS = ["-std=c11", "-fPIC", "-fvisibility=hidden", "-fno-math-errno", "-Wall", "-Wextra", *OPT]
# ATen's parallel_for is header-inline: without -fopenmp it compiles to a serial loop. Linking
# -fopenmp adds libgomp.so.1, which resolves to the copy torch already loaded (one OpenMP runtime).
CXX_FLAGS = ["-fvisibility=hidden", "-fopenmp", "-Wall", *OPT]
LINK_FLAGS = ["-fopenmp"]
if os.environ.get("MSATTN_SANITIZE", "0") == "1":  # make test-asan: AddressSanitizer + UBSan build
    SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", "-g"]
    C_FLAGS += SANITIZE
    CXX_FLAGS += SANITIZE
    LINK_FLAGS += SANITIZE
NVCC_FLAGS = [
    "-O3", "-std=c++17", "--use_fast_math",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
]


def want_cuda() -> bool:
    forced = os.environ.get("MSATTN_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and CUDA_HOME is not None and bool(CU_SOURCES)


class Build(BuildExtension):
    """Compiles the C kernels with the C compiler first, then lets BuildExtension do the rest."""

    def build_extension(self, ext):
        cc = new_compiler(verbose=self.verbose)
        customize_compiler(cc)
        objects = cc.compile(C_SOURCES, output_dir=self.build_temp, extra_postargs=C_FLAGS, depends=[
            *glob.glob("csrc/*.h"), *glob.glob("csrc/cpu/*.h")])
        ext.extra_objects = [*ext.extra_objects, *objects]
        super().build_extension(ext)


if want_cuda():
    ext = CUDAExtension(
        "msattn._C",
        CPU_GLUE + CUDA_GLUE + CU_SOURCES,
        extra_compile_args={"cxx": CXX_FLAGS + ["-DMSATTN_WITH_CUDA"], "nvcc": NVCC_FLAGS},
        extra_link_args=LINK_FLAGS,
    )
else:
    ext = CppExtension("msattn._C", CPU_GLUE, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS)

setup(
    packages=find_packages(include=["msattn", "msattn.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
