"""gpudoctor ceilings: measure this GPU's copy bandwidth and matrix rates, and keep them for the roofline."""

from __future__ import annotations

import argparse
import json

from gpudoctor.cli.base import Command
from gpudoctor.store.ceilings import ceilings_dir, slug


class CeilingsCommand(Command):
    name = "ceilings"
    help = "measure this GPU's real copy bandwidth and bf16/tf32/fp32 matrix rates and store them for the roofline"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", type=int, default=0, help="CUDA device index")
        p.add_argument("--out", metavar="FILE", help="also write the result here (- for stdout)")
        p.add_argument("--copy-bytes", type=int, default=2 << 30)

    def run(self, args: argparse.Namespace) -> int:
        from gpudoctor.collect.ceilings import measure_ceilings
        from gpudoctor.store.atomic import atomic_write_text, check_writable

        check_writable(args.out, "ceilings")  # before the measurement, not after it
        res = measure_ceilings(copy_bytes=args.copy_bytes, device=args.device)
        text = json.dumps(res, indent=1) + "\n"
        target = ceilings_dir() / (slug(res["device_name"]) + ".json")
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
        if args.out:
            atomic_write_text(args.out, text)
        print(f"{res['device_name']}: copy {res['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 {res['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, tf32 {res['tf32_flops_per_s'] / 1e12:.0f}, "
              f"fp32 {res['fp32_flops_per_s'] / 1e12:.1f}  (stored in {target})")
        return 0
