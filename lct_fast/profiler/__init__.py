"""Profiling of the training step, in one package (``launch/profile.py`` / ``lct-profile`` is its command line):

* :mod:`.phases`: the phase marks the step's code carries (``phase("jvp")``) and the timer that reads them;
* :mod:`.flops`: FLOP counting by phase, the closed forms of the DiT, the peak table;
* :mod:`.memory`: the memory model (ZeRO state, DiT activations) and the saved-tensor meter;
* :mod:`.step`: one rank's profile of the real step (timed phases, counted FLOPs, memory, trace);
* :mod:`.summary`: the profile record and its table (MFU, the ceiling of every GPU of the peak table);
* :mod:`.sweep`: one profile per point in fresh processes, OOMs recorded, CSV/Markdown/plot.

The package's namespace is its API (loaded on first use); model and method code import only :mod:`.phases`.
"""
import importlib

#: The package's API: name -> the module that defines it. Imported on first use (PEP 562), so that model and
#: method code importing :mod:`.phases` does not pull in the profile driver (which imports the config).
_API = {
    "memory": ("SavedTensorMeter", "activation_model", "expected_state_bytes", "predicted_bytes"),
    "step": ("NON_MODEL_PHASES", "STEP_PHASES", "ProfileOptions", "ceiling", "compile_report", "device_is_gpu",
             "device_name", "kernel_backends", "matmul_precision", "measure_step_ms", "profile_overrides",
             "profile_trainer", "versions"),
    "summary": ("format_table", "summarise"),
    "sweep": ("SWEEP_ALIASES", "classify_exit", "is_oom_error", "parse_sweep", "read_point_record", "run_sweep",
              "sweep_points", "write_sweep"),
}
_WHERE = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
