// Python module shell of the optional CUDA extension `lct_fast._C`.
//
// Each kernel family lives in its own pair of files: a torch-free `<name>_kernels.cu` (raw pointers, sizes,
// cudaStream_t) and a `<name>.cpp` binding that registers its ops with
//     TORCH_LIBRARY_FRAGMENT(lct_fast, m) { m.def("..."); }
//     TORCH_LIBRARY_IMPL(lct_fast, CUDA, m) { m.impl("...", &fn); }
// so that several families share this one extension; importing `lct_fast._C` runs those registrations and
// the ops appear as torch.ops.lct_fast.<name>. This file only provides the module's init symbol.
#include <Python.h>

static struct PyModuleDef lct_fast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                               "lct_fast CUDA kernels (ops registered in torch.ops.lct_fast)", -1,
                                               nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lct_fast_c_module); }
