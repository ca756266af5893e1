"""``autoseg info``: versions, devices and the work folder's planned datasets, for bug reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from autoseg.core.version import __version__


def info(workdir: Path) -> list[str]:
    """The lines ``info`` prints: versions, CUDA devices, CPU cores, then every planned dataset under
    ``workdir`` with the parameter count of each configuration's network."""
    import numpy
    import torch

    from autoseg.core.plan import load_plan
    from autoseg.model.network import network_parameters

    cuda = torch.cuda.is_available()
    devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else ""
    lines = [
        f"autoseg   {__version__}",
        f"python    {platform.python_version()} ({platform.platform()})",
        f"torch     {torch.__version__}",
        f"numpy     {numpy.__version__}",
        f"CUDA      {'yes: ' + devices if cuda else 'no'}",
        f"CPU cores {os.cpu_count()}",
    ]
    folder = workdir.expanduser().resolve()
    datasets = sorted(p.parent.name for p in folder.glob("*/plans.json")) if folder.is_dir() else []
    lines.append(f"work dir  {folder} ({', '.join(datasets) if datasets else 'no planned dataset'})")
    for name in datasets:
        plan = load_plan(folder / name / "plans.json")
        sizes = ", ".join(f"{c} {network_parameters(plan, cfg) / 1e6:.1f} M" for c, cfg in plan.configurations.items())
        lines.append(f"  {name}: network parameters {sizes}")
    return lines
