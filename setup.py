"""lct_fast: pip install -e . (CPU, no compiler needed) or, on a CUDA machine, pip install --no-build-isolation -e .

The CUDA extension (csrc/) is optional. It is built only when a CUDA-enabled torch and the CUDA toolkit are
importable from the build environment, or when LCT_FAST_BUILD_CUDA=1; LCT_FAST_SKIP_CUDA_BUILD=1 always skips
it. Everything in lct_fast falls back to Triton or PyTorch reference paths when the extension is absent.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    """Return (ext_modules, cmdclass) for csrc/, or ([], {}) with a one-line reason on stderr."""
    if os.environ.get("LCT_FAST_SKIP_CUDA_BUILD") == "1":
        print("lct_fast: LCT_FAST_SKIP_CUDA_BUILD=1, not building the CUDA extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not any(s.endswith(".cu") for s in sources):
        print("lct_fast: csrc/ has no kernels yet, not building the CUDA extension", file=sys.stderr)
        return [], {}
    forced = os.environ.get("LCT_FAST_BUILD_CUDA") == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        # pip's isolated build has no torch: use --no-build-isolation to build the extension.
        print("lct_fast: torch not importable at build time, not building the CUDA extension", file=sys.stderr)
        return [], {}
    if not forced and (torch.version.cuda is None or CUDA_HOME is None):
        print("lct_fast: no CUDA torch/toolkit, not building the CUDA extension "
              "(set LCT_FAST_BUILD_CUDA=1 to force)", file=sys.stderr)
        return [], {}
    ext = CUDAExtension(
        name="lct_fast._C",
        sources=sources,
        # cxx: torch's builder picks the C++ standard its headers need (C++20 since 2.10); the .cu files
        # include no torch header, so nvcc keeps C++17.
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="lct_fast",
    version="0.1.0",
    description="High-performance distributed trainer for latent consistency models (iLCT, sCT)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lct_fast", "lct_fast.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "webdataset>=0.2.86",
        # ZeRO-3 JVP support relies on 0.19-series internals (see lct_fast/trainer.py); tested with 0.19.8.
        "deepspeed>=0.19.3,<0.20",
        "POT>=0.9",
        "scipy>=1.10",
        "safetensors>=0.4",
        "tqdm",
        "pillow",
        "tensorboard",
    ],
    extras_require={
        # scikit-image ships the photographs of the quality benchmark; matplotlib draws its figures.
        # torch-fidelity: the image metrics' real code path runs in the tests (random-init Inception weights).
        # nvidia-dali-cuda130: the DALI reader's CPU pipeline runs in the tests.
        "dev": ["pytest>=7", "hypothesis", "triton", "diffusers>=0.27", "pillow", "scikit-image>=0.22",
                "matplotlib>=3.7", "torch-fidelity>=0.3", "nvidia-dali-cuda130", "mlxtend>=0.23"],
        "eval": ["torch-fidelity>=0.3"],
        "dali": ["nvidia-dali-cuda130"],
        "encode": ["diffusers>=0.27", "safetensors>=0.4", "pillow"],
    },
    # lct-train ... lct-encode: the same command lines as python launch/<name>.py and python -m lct_fast.cli.<name>
    entry_points={"console_scripts": [f"lct-{name} = lct_fast.cli.{name}:main"
                                      for name in ("train", "sample", "export", "evaluate", "profile", "report",
                                                   "encode")]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
