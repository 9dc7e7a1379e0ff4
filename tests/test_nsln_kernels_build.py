"""The NsLN CUDA sources compile (CI without a GPU): nvcc -c on the torch-free .cu, g++ on the binding."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nsln_kernels_cu_compiles(tmp_path):
    cmd = ["nvcc", "-c", "-O3", "-std=c++17", "--use_fast_math", "-arch=sm_90", "-I", CSRC,
           os.path.join(CSRC, "nsln_kernels.cu"), "-o", str(tmp_path / "nsln_kernels.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "nsln_kernels.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")
def test_nsln_binding_cpp_compiles(tmp_path):
    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    cmd = ["g++", "-c", "-std=c++17", "-O0", "-fPIC", *incs, os.path.join(CSRC, "nsln.cpp"),
           "-o", str(tmp_path / "nsln.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "nsln.o").stat().st_size > 0
