"""Every csrc/ source compiles on a machine without a GPU (as CI is): nvcc -c for sm_90 on each torch-free .cu,
g++ -c against torch's CPU-side headers on each .cpp binding. Catches build breaks before a GPU session, and
register spills: ptxas's resource report (-Xptxas -v) must show no spill stores in any kernel instance."""
import glob
import os
import re
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
    return res.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("src", CU, ids=os.path.basename)
def test_cu_compiles(tmp_path, src):
    out = str(tmp_path / "k.o")
    log = _compile(["nvcc", "-c", "-O3", "-std=c++17", "--use_fast_math", "-arch=sm_90", "-Xptxas", "-v",
                    "-I", CSRC, src, "-o", out], out)
    # ptxas prints, per entry function: "Compiling entry function 'NAME' for 'sm_90'" then
    # "N bytes stack frame, S bytes spill stores, L bytes spill loads"
    entries = re.findall(r"Compiling entry function '([^']+)'", log)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
    assert entries and len(spills) == len(entries), log[-4000:]
    spilling = [e for e, s in zip(entries, spills) if s > 0]
    assert not spilling, f"{os.path.basename(src)}: kernels spill registers on sm_90: {spilling}"


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")
@pytest.mark.parametrize("src", CPP, ids=os.path.basename)
def test_cpp_binding_compiles(tmp_path, src):
    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    out = str(tmp_path / "b.o")
    # the standard torch's own extension builder uses (setup.py leaves it to torch)
    _compile(["g++", "-c", "-std=c++20", "-O0", "-fPIC", *incs, src, "-o", out], out)


def test_every_kernel_has_a_binding():
    assert CU and CPP
    for cu in CU:
        stem = os.path.basename(cu).replace("_kernels.cu", "")
        assert os.path.join(CSRC, f"{stem}.cpp") in CPP, f"{cu} has no {stem}.cpp binding"
