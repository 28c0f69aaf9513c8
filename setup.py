"""Builds ``roberta_fast._C``: the CPU kernels always, the CUDA kernels where torch has CUDA and nvcc
is found. Install with ``pip install --no-build-isolation -e .`` so the build uses the torch that is
already installed (a build-isolation environment would download another one)."""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - a clear message instead of a traceback
    raise SystemExit("roberta_fast builds against the installed torch: install torch first, then "
                     f"`pip install --no-build-isolation -e .` ({exc})")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    if os.environ.get("ROBERTA_FAST_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


# Parallel compile jobs sized to the machine (ninja reads MAX_JOBS).
os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))

with_cuda = _want_cuda()
# The C++ standard is left to torch (its headers need C++17 or C++20 depending on the release).
cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]  # OpenMP: at::parallel_for
if os.environ.get("ROBERTA_FAST_NATIVE_ARCH", "1") == "1":
    # Built on the machine that runs it: let the compiler vectorize for this CPU.
    cxx_flags.append("-march=native")
sources = ["csrc/bindings.cpp"] + _sources("csrc/cpu/*.cpp")
include_dirs = [os.path.join(ROOT, "csrc")]

if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    ext = CUDAExtension(
        "roberta_fast._C",
        sources + _sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("WITH_CUDA", None)],
        extra_link_args=["-fopenmp"],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr"],
        },
    )
else:
    ext = CppExtension("roberta_fast._C", sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
