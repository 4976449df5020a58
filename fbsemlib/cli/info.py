"""``fbsem info``: versions, backends and devices."""

from __future__ import annotations


def cmd_info(args) -> int:
    import json

    import torch

    from fbsemlib.physics._parallelproj import parallelproj_available, parallelproj_info
    from fbsemlib.provenance import versions

    info = {
        **versions(),
        "cuda_available": torch.cuda.is_available(),
        "parallelproj": parallelproj_available(),
        **parallelproj_info(),  # its versions and whether its kernels were built with CUDA
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>25}: {v}")
    return 0
