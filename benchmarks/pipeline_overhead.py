"""Whole-pipeline cost of AnyMS against the stock IP-Adapter and diffusers' masked multi-image peer.

Times complete pipeline calls (same seed, same subjects, same prompt) for each configuration, interleaved
over several rounds on one thread, and prints the median seconds and the ratios measured in this run:

- ``stock``: diffusers' own ``IPAdapterAttnProcessor2_0``, all subjects in one softmax (no layout);
- ``peer``: the same processor with ``ip_adapter_masks`` (one hard box mask per subject, passed through
  ``cross_attention_kwargs``): what a diffusers user would pick for boxed subjects today;
- ``anyms``, ``mask``: AnyMS sessions with those variants; ``anyms+rec``: ``anyms`` recording its
  default maps (affinity and contribution, per resolution).

Ratios are of medians; "paired" is the median over rounds of each round's own ratio (the configurations
of one round run back to back, so this cancels slow drift of a shared machine).

With ``--compile BACKEND`` every configuration is also timed on a second copy of the pipeline whose UNet
was compiled in place (``pipe.unet.compile(backend=BACKEND)``), in the same rounds; compilation happens
in the warm-up, outside the timings.

    python benchmarks/pipeline_overhead.py --model toy --subjects 2 5 7 --rounds 7
    python benchmarks/pipeline_overhead.py --model tiny-sdxl --subjects 5 --compile inductor
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from anyms_core import Subject, decoupled
from anyms_core.layout import box_to_cells
from anyms_core.models import load_pipeline

BOXES = [[0.02, 0.1, 0.35, 0.6], [0.3, 0.05, 0.65, 0.5], [0.6, 0.1, 0.98, 0.6], [0.05, 0.55, 0.5, 0.95],
         [0.45, 0.5, 0.95, 0.95], [0.7, 0.6, 1.0, 1.0], [0.2, 0.3, 0.55, 0.75], [0.0, 0.0, 0.3, 0.3],
         [0.65, 0.0, 1.0, 0.35], [0.35, 0.35, 0.65, 0.65]]
COLORS = ["red", "cyan", "yellow", "magenta", "lime", "blue", "orange", "white", "purple", "gray"]
CONFIGS = ("stock", "peer", "anyms", "mask", "anyms+rec")


def box_masks(boxes: list[list[float]], height: int, width: int) -> torch.Tensor:
    """[1, S, height, width] hard 0/1 masks of the boxes at image resolution, for ``ip_adapter_masks``."""
    masks = torch.zeros(1, len(boxes), height, width)
    for index, box in enumerate(boxes):
        row0, row1, col0, col1 = box_to_cells(box, height, width)
        masks[0, index, row0:row1, col0:col1] = 1.0
    return masks


def make_runner(pipe, name: str, subjects: list[Subject], call_kwargs: dict):
    images = [[s.image for s in subjects]]
    height = call_kwargs.get("height") or pipe.unet.config.sample_size * pipe.vae_scale_factor

    def call(ip_images, **extra):
        start = time.perf_counter()
        pipe("a photo at night", ip_adapter_image=ip_images, generator=torch.Generator().manual_seed(0),
             output_type="np", **call_kwargs, **extra)
        return time.perf_counter() - start

    if name == "stock":
        return lambda: call(images)
    if name == "peer":
        masks = box_masks([s.box for s in subjects], height, call_kwargs.get("width", height))
        return lambda: call(images, cross_attention_kwargs={"ip_adapter_masks": [masks]})
    variant, record = ("anyms", True) if name == "anyms+rec" else (name, None)

    def in_session():
        with decoupled(pipe, subjects, variant=variant, record=record) as session:
            return call(session.ip_adapter_image)

    return in_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="toy, tiny-sdxl or tiny-sd15")
    parser.add_argument("--subjects", type=int, nargs="+", default=[2, 5, 7])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--compile", default=None, help="also time a copy whose UNet is compiled with this backend")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipes = {"eager": load_pipeline(args.model, device=args.device)}
    if args.compile:
        pipes["compiled"] = load_pipeline(args.model, device=args.device)
        pipes["compiled"].unet.compile(backend=args.compile)
    call_kwargs = {"height": 64, "width": 64, "num_inference_steps": 10} if args.model.startswith("tiny") else {}
    from PIL import Image

    results = {}
    for count in args.subjects:
        subjects = [Subject(Image.new("RGB", (32, 32), COLORS[i]), BOXES[i], name=f"s{i}") for i in range(count)]
        runners = {(mode, name): make_runner(pipe, name, subjects, call_kwargs) for mode, pipe in pipes.items() for name in args.configs}
        warmup_start = time.perf_counter()
        for runner in runners.values():
            runner()  # warm-up (and compilation)
        warmup = time.perf_counter() - warmup_start
        times = {key: [] for key in runners}
        for _ in range(args.rounds):
            for key, runner in runners.items():  # interleaved, so machine noise hits all alike
                times[key].append(runner())
        medians = {key: statistics.median(values) for key, values in times.items()}

        def paired(a, b):  # median over rounds of the per-round ratio a/b: robust to drift between rounds
            return statistics.median(x / y for x, y in zip(times[a], times[b]))
        print(f"model={args.model} subjects={count} rounds={args.rounds} warm-up {warmup:.1f} s (median ms per image)")
        for mode in pipes:
            stock = medians.get((mode, "stock"))
            for name in args.configs:
                median = medians[(mode, name)]
                spread = (min(times[(mode, name)]) * 1e3, max(times[(mode, name)]) * 1e3)
                ratio = f"x{median / stock:5.3f} stock (paired x{paired((mode, name), (mode, 'stock')):5.3f})" if stock else ""
                print(f"  {mode:<8} {name:<10} {median * 1e3:8.1f} ms  [{spread[0]:.1f}..{spread[1]:.1f}]  {ratio}")
            ratios = []
            if (mode, "peer") in medians and (mode, "anyms") in medians:
                ratios.append(f"anyms/peer x{medians[(mode, 'anyms')] / medians[(mode, 'peer')]:.3f} "
                              f"(paired x{paired((mode, 'anyms'), (mode, 'peer')):.3f})")
            if (mode, "anyms+rec") in medians and (mode, "anyms") in medians:
                ratios.append(f"recording/anyms x{medians[(mode, 'anyms+rec')] / medians[(mode, 'anyms')]:.3f} "
                              f"(paired x{paired((mode, 'anyms+rec'), (mode, 'anyms')):.3f})")
            if mode == "compiled":
                ratios += [f"{name} compiled/eager x{medians[('compiled', name)] / medians[('eager', name)]:.3f}" for name in args.configs]
            print(f"  {mode:<8} " + ";  ".join(ratios))
        results[count] = {f"{mode}/{name}": {"median_ms": round(m * 1e3, 2), "all_ms": [round(t * 1e3, 2) for t in times[(mode, name)]]}
                          for (mode, name), m in medians.items()}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "rounds": args.rounds, "compile": args.compile, "threads": 1,
                       "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                       "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
