"""``fbsem info``: versions, backends and devices."""

from __future__ import annotations


def cmd_info(args) -> int:
    import json
    import platform

    import torch

    from fbsemlib import __version__
    from fbsemlib.physics.projector import parallelproj_available

    info = {
        "fbsemlib": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "parallelproj": parallelproj_available(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>15}: {v}")
    return 0
