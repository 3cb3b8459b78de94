"""gpudoctor ceilings: measure this GPU's copy bandwidth and matrix rates, and write them for the roofline."""

from __future__ import annotations

import argparse
import json

from gpudoctor.cli.base import Command
from gpudoctor.collect.ceilings import measure_ceilings
from gpudoctor.store.atomic import atomic_write_text


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


class CeilingsCommand(Command):
    name = "ceilings"
    help = "measure this GPU's real copy bandwidth and bf16/tf32/fp32 matrix rates and write them for the roofline"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", type=int, default=0, help="CUDA device index")
        p.add_argument("--out", metavar="FILE",
                       help="where to write them (default: ceilings_<gpu>.json in the current directory)")
        p.add_argument("--copy-bytes", type=int, default=2 << 30)

    def run(self, args: argparse.Namespace) -> int:
        res = measure_ceilings(copy_bytes=args.copy_bytes, device=args.device)
        target = args.out or f"ceilings_{_slug(res['device_name'])}.json"
        atomic_write_text(target, json.dumps(res, indent=1) + "\n")
        print(f"{res['device_name']}: copy {res['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 {res['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, tf32 {res['tf32_flops_per_s'] / 1e12:.0f}, "
              f"fp32 {res['fp32_flops_per_s'] / 1e12:.1f}  (written to {target}; use it with "
              f'ceilings_file = "{target}" in gpudoctor.toml, or gpudoctor dashboard --ceilings {target})')
        return 0
