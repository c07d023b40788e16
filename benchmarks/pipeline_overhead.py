"""Whole-pipeline overhead of AnyMS over the stock IP-Adapter processor, and of recording.

Times complete pipeline calls (same seed, same subjects) with diffusers' stock processors (all
subjects in one softmax), with AnyMS (`anyms`), and with AnyMS plus recording, interleaved over
several rounds on one thread, and prints the median ratios measured in this run.

    python benchmarks/pipeline_overhead.py --model toy --subjects 3 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anyms_core import Subject, decoupled
from anyms_core.models import load_pipeline

BOXES = [[0.02, 0.1, 0.35, 0.6], [0.3, 0.05, 0.65, 0.5], [0.6, 0.1, 0.98, 0.6], [0.05, 0.55, 0.5, 0.95], [0.45, 0.5, 0.95, 0.95]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model, device=args.device)
    from PIL import Image

    references = [Image.new("RGB", (32, 32), color) for color in ("red", "cyan", "yellow", "magenta", "lime")]
    subjects = [Subject(references[i], BOXES[i], name=f"s{i}") for i in range(args.subjects)]
    images = [[s.image for s in subjects]]
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 10} if args.model.startswith("tiny") else {}

    def call(ip_images):
        start = time.perf_counter()
        pipe("a photo at night", ip_adapter_image=ip_images, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
        return time.perf_counter() - start

    configs = {
        "stock": lambda: call(images),
        "anyms": lambda: _in_session(pipe, subjects, None, call),
        "anyms + recording": lambda: _in_session(pipe, subjects, True, call),
    }
    for run in configs.values():
        run()  # warm-up
    times = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, run in configs.items():  # interleaved, so machine noise hits all alike
            times[name].append(run())
    stock = statistics.median(times["stock"])
    print(f"model={args.model} subjects={args.subjects} rounds={args.rounds} device={args.device} (median seconds per image)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<18} {median * 1e3:8.1f} ms   ratio vs stock {median / stock:5.3f}")
    recording = statistics.median(times["anyms + recording"]) / statistics.median(times["anyms"])
    print(f"  recording overhead over anyms: {100 * (recording - 1):+.1f}%")


def _in_session(pipe, subjects, record, call):
    with decoupled(pipe, subjects, variant="anyms", record=record) as session:
        return call(session.ip_adapter_image)


if __name__ == "__main__":
    main()
