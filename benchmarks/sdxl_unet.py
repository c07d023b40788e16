"""Full-size SDXL UNet timing: stock IP-Adapter processor vs AnyMS, with and without recording.

Builds the SDXL base UNet from its config with random fp16 weights (no download: weights do not
change the timing) plus a random 4-token IP-Adapter, and times 30 denoising steps at 1024x1024
(128x128 latents, classifier-free guidance batch of 2) with 5 subjects. Reports seconds per image
(UNet only; the VAE decode and text encoders are outside the loop) and peak GPU memory.

    python benchmarks/sdxl_unet.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
import types

import torch

from anyms_core import Subject, decoupled
from anyms_core.testing import random_ip_adapter_state_dict

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
BOXES = [[0.02, 0.1, 0.35, 0.6], [0.3, 0.05, 0.65, 0.5], [0.6, 0.1, 0.98, 0.6], [0.05, 0.55, 0.5, 0.95], [0.45, 0.5, 0.95, 0.95]]


def build_unet(device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    state = random_ip_adapter_state_dict(unet, image_embed_dim=1280, std=0.02)
    unet._load_ip_adapter_weights([state])  # what pipe.load_ip_adapter calls underneath
    return unet.to(device=device, dtype=dtype).eval()


def time_loop(unet, steps: int, num_subjects: int, device: str, dtype: torch.dtype, size: int) -> float:
    latent = size // 8
    generator = torch.Generator(device).manual_seed(0)
    sample = torch.randn(2, 4, latent, latent, device=device, dtype=dtype, generator=generator)
    text = torch.randn(2, 77, 2048, device=device, dtype=dtype, generator=generator)
    added = {"text_embeds": torch.randn(2, 1280, device=device, dtype=dtype, generator=generator),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype),
             "image_embeds": [torch.randn(2, num_subjects, 1280, device=device, dtype=dtype, generator=generator)]}
    with torch.no_grad():
        unet(sample, 999, encoder_hidden_states=text, added_cond_kwargs=added)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(steps):
            out = unet(sample, 999 - step * 33, encoder_hidden_states=text, added_cond_kwargs=added).sample
            sample = sample - 0.01 * out  # keep a data dependency between steps
        if device == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    unet = build_unet(args.device, dtype)
    pipe = types.SimpleNamespace(unet=unet, do_classifier_free_guidance=True)  # decoupled() needs only these
    from PIL import Image

    subjects = [Subject(Image.new("RGB", (8, 8)), box, name=f"s{i}") for i, box in enumerate(BOXES[: args.subjects])]
    import contextlib
    import statistics

    configs = {
        "stock (joint softmax, diffusers processor)": lambda: contextlib.nullcontext(),
        "anyms": lambda: decoupled(pipe, subjects, variant="anyms"),
        "mask": lambda: decoupled(pipe, subjects, variant="mask"),
        "none": lambda: decoupled(pipe, subjects, variant="none"),
        "anyms + recording (affinity, contribution; per resolution)": lambda: decoupled(pipe, subjects, variant="anyms", record=True),
    }
    seconds = {name: [] for name in configs}
    results = {name: {} for name in configs}
    for _ in range(args.rounds):  # interleaved rounds: drift of the machine hits every configuration alike
        for name, make_context in configs.items():
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with make_context() as session:
                seconds[name].append(time_loop(unet, args.steps, args.subjects, args.device, dtype, args.size))
            if args.device == "cuda":
                results[name]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if session is not None and session.attention is not None:
                results[name]["recorded_mib"] = round(session.attention.nbytes / 2**20, 2)
    for name, values in seconds.items():
        results[name]["seconds_per_image"] = round(statistics.median(values), 3)
        results[name]["all_rounds"] = [round(v, 3) for v in values]
        print(name, results[name], flush=True)
    stock = results["stock (joint softmax, diffusers processor)"]["seconds_per_image"]
    for name, entry in results.items():
        entry["ratio_vs_stock"] = round(entry["seconds_per_image"] / stock, 3)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "steps": args.steps,
                       "size": args.size, "subjects": args.subjects, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
