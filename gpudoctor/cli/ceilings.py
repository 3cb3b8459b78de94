"""gpudoctor ceilings: measure this GPU's copy bandwidth and matrix rates, and keep them for the roofline."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from gpudoctor.cli.base import Command
from gpudoctor.collect.ceilings import measure_ceilings
from gpudoctor.store.atomic import atomic_write_text


def ceilings_dir() -> Path:
    base = os.environ.get("GPUDOCTOR_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "gpudoctor")
    return Path(base) / "ceilings"


def stored_ceilings(device_name: str) -> dict | None:
    """Ceilings measured earlier on a GPU of this name, or None."""
    p = ceilings_dir() / (_slug(device_name) + ".json")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


class CeilingsCommand(Command):
    name = "ceilings"
    help = "measure this GPU's real copy bandwidth and bf16/tf32/fp32 matrix rates and store them for the roofline"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", type=int, default=0, help="CUDA device index")
        p.add_argument("--out", metavar="FILE", help="also write the result here")
        p.add_argument("--copy-bytes", type=int, default=2 << 30)

    def run(self, args: argparse.Namespace) -> int:
        res = measure_ceilings(copy_bytes=args.copy_bytes, device=args.device)
        text = json.dumps(res, indent=1) + "\n"
        target = ceilings_dir() / (_slug(res["device_name"]) + ".json")
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
        if args.out:
            atomic_write_text(args.out, text)
        print(f"{res['device_name']}: copy {res['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 {res['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, tf32 {res['tf32_flops_per_s'] / 1e12:.0f}, "
              f"fp32 {res['fp32_flops_per_s'] / 1e12:.1f}  (stored in {target})")
        return 0
