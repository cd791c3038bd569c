"""One JSON line naming the card and the software that measured a device run (for the raw files
under docs/measurements/): GPU name, memory and driver from nvidia-smi, package versions."""
from __future__ import annotations

import importlib
import json
import platform
import subprocess
from typing import Any

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "numpy",
            "torch", "timm")


def machine_info() -> dict[str, Any]:
    """Card (nvidia-smi), CUDA devices as JAX sees them, and the versions of PACKAGES."""
    info: dict[str, Any] = {"what": "machine", "python": platform.python_version()}
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
