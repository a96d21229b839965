"""``python -m treelora info``: versions, devices, the compiled extension and which backend can run each op."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from typing import Any

import torch

import treelora.ops  # noqa: F401  (registers every op family's backends)
from treelora import _cpp_lib, backends
from treelora._version import __version__

_PACKAGES = ("torch", "triton", "numpy", "peft", "transformers", "safetensors", "pybind11")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> dict[str, Any]:
    out: dict[str, Any] = {"cpu_threads": torch.get_num_threads()}
    if not torch.cuda.is_available():
        out["cuda"] = "not available" + (" (torch built without CUDA)" if torch.version.cuda is None else "")
        return out
    out["cuda"] = [
        {
            "index": i,
            "name": torch.cuda.get_device_name(i),
            "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(i)),
            "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
        }
        for i in range(torch.cuda.device_count())
    ]
    out["torch_cuda"] = torch.version.cuda
    return out


def _probe_inputs(device: torch.device) -> dict[str, tuple[tuple, dict]]:
    """A small typical input per op, to ask each backend whether it could run it on ``device``."""
    f32 = dict(device=device, dtype=torch.float32)
    x, w = torch.zeros(4, 32, **f32), torch.zeros(32, 32, **f32)
    a, b = torch.zeros(8, 32, **f32), torch.zeros(32, 8, **f32)
    q, bank = torch.zeros(2, 16, **f32), torch.zeros(3, 2, 16, **f32)
    index = torch.zeros(2, dtype=torch.int64, device=device)
    p = [torch.zeros(8, **f32)]
    return {
        "lora_linear": ((x, w, None, a, b, 1.0, 0.0, 0), {}),
        "pairwise_similarity": ((q, bank, "l1", index, None), {}),
        "accumulate_and_compare_": ((q, q, 1.0, bank, index, "l1", None), {}),
        "masked_adamw_": (
            (p, p, p, p, 1),
            dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, masks=None, density=None),
        ),
        "masked_sgd_": ((p, p, p), dict(lr=1e-3, momentum=0.9, weight_decay=0.0, masks=None, density=None)),
    }


def collect() -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probes = _probe_inputs(device)
    ops: dict[str, Any] = {}
    for op in backends.registered_ops():
        args, kwargs = probes.get(op, ((), {}))
        ops[op] = {}
        for name in backends.BACKEND_NAMES:
            backend = backends.backends_for(op).get(name)
            if backend is None:
                ops[op][name] = ["not implemented for this op"]
            elif op in probes:
                ops[op][name] = backend.reasons(*args, **kwargs)
            else:
                ops[op][name] = backend.environment()
    return {
        "treelora": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "devices": _devices(),
        "extension": _cpp_lib.status(),
        "environment": {k: os.environ.get(k, "") for k in ("TREELORA_BACKEND", "TRITON_INTERPRET")},
        "probe_device": str(device),
        "ops": ops,
    }


def format_report(info: dict[str, Any]) -> str:
    lines = [f"treelora {info['treelora']}  (python {info['python']}, {info['platform']})"]
    lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    dev = info["devices"]
    cuda = dev["cuda"]
    if isinstance(cuda, str):
        lines.append(f"devices:  cpu ({dev['cpu_threads']} threads); cuda: {cuda}")
    else:
        gpus = "; ".join(f"cuda:{g['index']} {g['name']} ({g['capability']}, {g['memory_gib']} GiB)" for g in cuda)
        lines.append(f"devices:  cpu ({dev['cpu_threads']} threads); {gpus}; torch CUDA {dev['torch_cuda']}")
    ext = info["extension"]
    if ext["importable"]:
        archs = ", ".join(ext["archs"])
        gpu = "usable GPU found" if not ext["device_error"] else f"no usable GPU ({ext['device_error']})"
        lines.append(f"treelora._C: built for {archs} with CUDA {ext['cuda_runtime']}; {gpu}")
        lines.append(f"             entry points: {', '.join(ext['entry_points'])}")
    else:
        lines.append(f"treelora._C: not built ({ext['reason']})")
    env = ", ".join(f"{k}={v or '(unset)'}" for k, v in info["environment"].items())
    lines.append(f"environment: {env}")
    lines.append(f"backends (probed with small fp32 inputs on {info['probe_device']}; tried cuda -> triton -> torch):")
    for op, table in info["ops"].items():
        lines.append(f"  {op}")
        for name, reasons in table.items():
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            lines.append(f"    {name:<7} {status}")
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if as_json else format_report(info))
    return 0
