"""A real training job for the long-job benchmarks: a Hugging Face Llama (random weights, built from a
config: no hub access needed) trained with torch.optim.AdamW on random tokens for a given time. Plain
user code: no gpudoctor annotations; it reads ``loss.item()`` every 10 steps as training loops do.

    python bench/workloads/long_train.py --seconds 360 --log steps.jsonl

Each line of --log is {"step": i, "t_ns": wall-clock ns at the end of the step}: the benchmark compares
step times outside the capture window with those of an unprofiled run.
"""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=360.0)
    ap.add_argument("--log", help="JSON lines, one per step")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=args.layers,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=args.seq)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")
    log = open(args.log, "w") if args.log else None
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < args.seconds:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0:
            loss.item()
        if log:
            log.write(json.dumps({"step": step, "t_ns": time.time_ns()}) + "\n")
    torch.cuda.synchronize()
    if log:
        log.close()
    print(f"trained {step} steps in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
