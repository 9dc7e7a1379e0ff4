"""Every csrc/ source compiles on a machine without a GPU (as CI is): nvcc -c for sm_90 on each torch-free .cu,
g++ -c against torch's CPU-side headers on each .cpp binding. Catches build breaks before a GPU session."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
CU = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
CPP = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))


def _compile(cmd, out):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert os.path.getsize(out) > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("src", CU, ids=os.path.basename)
def test_cu_compiles(tmp_path, src):
    out = str(tmp_path / "k.o")
    _compile(["nvcc", "-c", "-O3", "-std=c++17", "--use_fast_math", "-arch=sm_90", "-I", CSRC, src, "-o", out], out)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")
@pytest.mark.parametrize("src", CPP, ids=os.path.basename)
def test_cpp_binding_compiles(tmp_path, src):
    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    out = str(tmp_path / "b.o")
    _compile(["g++", "-c", "-std=c++17", "-O0", "-fPIC", *incs, src, "-o", out], out)


def test_every_kernel_has_a_binding():
    assert CU and CPP
    for cu in CU:
        stem = os.path.basename(cu).replace("_kernels.cu", "")
        assert os.path.join(CSRC, f"{stem}.cpp") in CPP, f"{cu} has no {stem}.cpp binding"
