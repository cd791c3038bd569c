"""One JSON line naming the card and the software that measured a device run (for the raw files
under docs/measurements/): GPU name, memory and driver from nvidia-smi, package versions."""
from __future__ import annotations

import importlib
import json
import platform
import subprocess
from typing import Any

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "numpy",
            "PIL", "torch", "timm")  # PIL: its JPEG decoder sets the pixels every run trains on


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (XLA:CPU's results depend on it), or why not."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name")), "unknown")
    except OSError as error:
        return f"unknown ({type(error).__name__})"


def machine_info() -> dict[str, Any]:
    """Card (nvidia-smi), CPU model, the devices as JAX sees them, and the versions of
    PACKAGES."""
    info: dict[str, Any] = {"what": "machine", "python": platform.python_version(),
                            "cpu": cpu_model()}
    try:
        query = "name,memory.total,driver_version"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        info["gpus"] = [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError) as error:
        info["gpus"] = f"no nvidia-smi ({type(error).__name__})"
    for name in PACKAGES:
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as error:  # report what is missing instead of failing the device run
            info[name] = f"MISSING ({type(error).__name__})"
    try:
        import jax
        info["jax_devices"] = [str(device) for device in jax.devices()]
    except Exception as error:
        info["jax_devices"] = f"{type(error).__name__}: {error}"
    return info


if __name__ == "__main__":
    print(json.dumps(machine_info()), flush=True)
