"""Per-call cost of the AnyMS processor at real SDXL cross-attention shapes, as ratios in one run.

For each layer shape (10 heads x 64x64 x 640 and 20 heads x 32x32 x 1280), tokens per subject
(4 base, 16 plus) and subject count (2, 5), times one processor call (CFG batch of 2) for
``text`` (no image branch), ``anyms``, ``mask``, ``none``, diffusers' stock processor (joint softmax)
and stock with masks. The image-branch cost is the call's time minus the ``text`` call's.

    python benchmarks/processor_cost.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from anyms_core.layout import GridLayout
from anyms_core.processor import AnyMSAttnProcessor, DecoupledState

SHAPES = [(10, 64, 640), (20, 32, 1280)]  # heads, grid side, channels (SDXL at 1024x1024)
BOXES = [[0.02, 0.1, 0.35, 0.6], [0.3, 0.05, 0.65, 0.5], [0.6, 0.1, 0.98, 0.6], [0.05, 0.55, 0.5, 0.95], [0.45, 0.5, 0.95, 0.95]]


def timed(function, repeats: int, device: str) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = args.device, torch.float16 if args.device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_num_threads(1)
    print(f"device={device} dtype={dtype} (median of {args.repeats} calls; ratios are to the stock processor)")
    print("whole call: time / stock time;  image branch: call time minus the text-only call, in ms")
    print(f"{'layer':>20} {'tok':>3} {'S':>2} | {'anyms':>6} {'mask':>6} {'none':>6} {'st+msk':>6} | "
          f"{'anyms':>7} {'mask':>7} {'stock':>7} {'st+msk':>7} ms | stock call")
    for heads, side, channels in SHAPES:
        torch.manual_seed(0)
        with torch.device(device):
            attn = Attention(query_dim=channels, cross_attention_dim=2048, heads=heads, dim_head=64).to(dtype).eval()
            hidden = torch.randn(2, side * side, channels, dtype=dtype)
            text = torch.randn(2, 77, 2048, dtype=dtype)
        for tokens in (4, 16):
            stock = IPAdapterAttnProcessor2_0(channels, 2048, num_tokens=(tokens,), scale=1.0).to(device, dtype)
            for count in (2, 5):
                boxes = BOXES[:count]
                images = torch.randn(2, count, tokens, 2048, device=device, dtype=dtype)
                masks = [GridLayout.build(boxes, list(range(count)), side, side).masks.view(1, count, side, side).to(device)]
                times = {}
                with torch.no_grad():
                    for variant in ("text", "anyms", "mask", "none"):
                        state = DecoupledState(variant=variant, boxes=boxes, paint_order=list(range(count)))
                        state.latent_size = (side, side)
                        processor = AnyMSAttnProcessor(stock, "bench", state)
                        times[variant] = timed(lambda: processor(attn, hidden, (text, [images])), args.repeats, device)
                    times["stock"] = timed(lambda: stock(attn, hidden, (text, [images])), args.repeats, device)
                    times["stock+masks"] = timed(lambda: stock(attn, hidden, (text, [images]), ip_adapter_masks=masks), args.repeats, device)
                ratio = {k: v / times["stock"] for k, v in times.items()}
                branch = {k: (times[k] - times["text"]) * 1e3 for k in ("anyms", "mask", "stock", "stock+masks")}
                print(f"{heads:>3}h {side}x{side} x{channels:>5} {tokens:>3} {count:>2} | "
                      f"{ratio['anyms']:6.2f} {ratio['mask']:6.2f} {ratio['none']:6.2f} {ratio['stock+masks']:6.2f} | "
                      f"{branch['anyms']:7.2f} {branch['mask']:7.2f} {branch['stock']:7.2f} {branch['stock+masks']:7.2f} ms | "
                      f"{times['stock'] * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
