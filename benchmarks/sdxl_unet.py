"""Full-size SDXL timing on a GPU: stock IP-Adapter, diffusers' masked peer and AnyMS; eager, torch.compile, CUDA graphs.

Builds the SDXL base UNet from its config with random fp16 weights (no download: weights do not change
the timing) plus a random 4-token IP-Adapter, and measures, in interleaved rounds (medians reported):

1. ``unet``: 30 denoising steps at 1024x1024 (128x128 latents, CFG batch of 2), 5 subjects, per configuration
   (``stock``: one softmax over all subjects; ``peer``: stock + ``ip_adapter_masks``, one box mask per subject;
   ``anyms``; ``mask``; ``none``; ``anyms+rec``: recording affinity and contribution per resolution) and per
   mode (``eager``; ``compile``: ``torch.compile(unet)``; ``cudagraphs``: ``torch.compile(unet,
   mode="reduce-overhead")``), with peak GPU memory. Compilation happens in the warm-up, which also checks
   that a second layout of the same subject count does not recompile.
2. ``scaling``: UNet seconds per image vs subjects (1-10, at 1024x1024) and vs resolution (512-1536, 5 subjects)
   for ``stock``, ``peer`` and ``anyms``, eager.
3. ``pipeline``: end-to-end seconds per image (text encoders, image encoder, 30 UNet steps, VAE decode) of a
   whole ``StableDiffusionXLPipeline`` built from the SDXL configs with random weights, ``stock`` vs ``anyms``
   (the paper reports 19 s and 11 GB per image on an H100 for its SDXL pipeline).

    python benchmarks/sdxl_unet.py --device cuda --json results/sdxl_unet_gpu.json
    python benchmarks/sdxl_unet.py --tiny --device cpu --steps 2 --rounds 1 --compile-backend aot_eager \
        --scaling-subjects 1 5 10 --scaling-sizes 256 512 --size 256      # smoke test of every section on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import types

import torch

from anyms_core import Subject, decoupled
from anyms_core.layout import box_to_cells
from anyms_core.testing import random_ip_adapter_state_dict

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
BOXES = [[0.02, 0.1, 0.35, 0.6], [0.3, 0.05, 0.65, 0.5], [0.6, 0.1, 0.98, 0.6], [0.05, 0.55, 0.5, 0.95],
         [0.45, 0.5, 0.95, 0.95], [0.7, 0.6, 1.0, 1.0], [0.2, 0.3, 0.55, 0.75], [0.0, 0.0, 0.3, 0.3],
         [0.65, 0.0, 1.0, 0.35], [0.35, 0.35, 0.65, 0.65]]
OTHER_BOXES = [[1 - b[2], b[1], 1 - b[0], b[3]] for b in BOXES]  # mirrored: the second layout of the no-recompile check
CONFIGS = ("stock", "peer", "anyms", "mask", "none", "anyms+rec")
MODES = ("eager", "compile", "cudagraphs")


class Bench:
    """The UNet under test and how to feed it; ``tiny`` swaps in the tiny random SDXL of the tests."""

    def __init__(self, device: str, tiny: bool):
        self.device, self.tiny = device, tiny
        self.dtype = torch.float16 if device == "cuda" else torch.float32
        if tiny:
            from anyms_core.testing import tiny_sdxl_pipeline

            self.unet = tiny_sdxl_pipeline().unet.to(device)
            self.text_dim, self.pooled_dim, self.image_dim = 64, 32, 32
        else:
            from diffusers import UNet2DConditionModel

            with torch.device(device):
                unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
            unet._load_ip_adapter_weights([random_ip_adapter_state_dict(unet, image_embed_dim=1280, std=0.02)])
            self.unet = unet.to(device=device, dtype=self.dtype).eval()
            self.text_dim, self.pooled_dim, self.image_dim = 2048, 1280, 1280
        self.pipe = types.SimpleNamespace(unet=self.unet, do_classifier_free_guidance=True)  # all decoupled() needs

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def inputs(self, num_subjects: int, size: int) -> dict:
        g = torch.Generator(self.device).manual_seed(0)
        kw = dict(device=self.device, dtype=self.dtype, generator=g)
        return dict(
            sample=torch.randn(2, 4, size // 8, size // 8, **kw), encoder_hidden_states=torch.randn(2, 77, self.text_dim, **kw),
            added_cond_kwargs={"text_embeds": torch.randn(2, self.pooled_dim, **kw),
                               "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device=self.device, dtype=self.dtype),
                               "image_embeds": [torch.randn(2, num_subjects, self.image_dim, **kw)]},
        )

    def loop(self, unet, steps: int, inputs: dict, cross_attention_kwargs: dict | None) -> float:
        sample = inputs["sample"]
        with torch.no_grad():
            self.sync()
            start = time.perf_counter()
            for step in range(steps):
                timestep = torch.tensor(999 - step * 33, device=self.device)  # a tensor, as pipelines pass it (an int would be a compile-time constant)
                out = unet(sample, timestep, encoder_hidden_states=inputs["encoder_hidden_states"],
                           added_cond_kwargs=inputs["added_cond_kwargs"], cross_attention_kwargs=cross_attention_kwargs).sample
                sample = sample - 0.01 * out  # keep a data dependency between steps
            self.sync()
        return time.perf_counter() - start

    def run(self, unet, config: str, steps: int, num_subjects: int, size: int, boxes=BOXES) -> tuple[float, dict]:
        """One timed loop of ``config``; returns seconds and facts (peak memory, recorded bytes)."""
        subjects = [Subject(_blank(), box, name=f"s{i}") for i, box in enumerate(boxes[:num_subjects])]
        inputs = self.inputs(num_subjects, size)
        kwargs = None
        if config == "peer":
            kwargs = {"ip_adapter_masks": [_box_masks([s.box for s in subjects], size).to(self.device, self.dtype)]}
        if config in ("stock", "peer"):
            session_context = contextlib.nullcontext()
        else:
            variant, record = ("anyms", True) if config == "anyms+rec" else (config, None)
            session_context = decoupled(self.pipe, subjects, variant=variant, record=record)
        facts = {}
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with session_context as session:
            seconds = self.loop(unet, steps, inputs, kwargs)
        if self.device == "cuda":
            facts["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if session is not None and session.attention is not None:
            facts["recorded_mib"] = round(session.attention.nbytes / 2**20, 3)
        return seconds, facts


def _blank():
    from PIL import Image

    return Image.new("RGB", (8, 8))


def _box_masks(boxes: list[list[float]], size: int) -> torch.Tensor:
    masks = torch.zeros(1, len(boxes), size, size)
    for index, box in enumerate(boxes):
        row0, row1, col0, col1 = box_to_cells(box, size, size)
        masks[0, index, row0:row1, col0:col1] = 1.0
    return masks


def section_unet(bench: Bench, args) -> dict:
    import torch._dynamo

    unets = {"eager": bench.unet}
    for mode in args.modes:
        if mode == "compile":
            unets[mode] = torch.compile(bench.unet, backend=args.compile_backend)
        elif mode == "cudagraphs":
            unets[mode] = torch.compile(bench.unet, mode="reduce-overhead")
    wanted = {"eager": args.configs, "compile": args.compiled_configs, "cudagraphs": args.cudagraph_configs}
    keys = [(mode, config) for mode in unets for config in args.configs if config in wanted[mode]]
    results = {f"{m}/{c}": {} for m, c in keys}
    for mode, config in keys:  # warm-up: compiles; then a mirrored layout must not recompile
        start = time.perf_counter()
        bench.run(unets[mode], config, 2, args.subjects, args.size)
        compile_s = time.perf_counter() - start
        frames = torch._dynamo.utils.counters["frames"]["ok"]
        bench.run(unets[mode], config, 2, args.subjects, args.size, boxes=OTHER_BOXES)
        entry = results[f"{mode}/{config}"]
        entry["warmup_s"] = round(compile_s, 2)
        entry["new_graphs_for_second_layout"] = torch._dynamo.utils.counters["frames"]["ok"] - frames
        print(f"warm-up {mode}/{config}: {compile_s:.1f} s, new graphs for a second layout: {entry['new_graphs_for_second_layout']}", flush=True)
    seconds = {key: [] for key in keys}
    for _ in range(args.rounds):  # interleaved rounds: drift of the machine hits every configuration alike
        for mode, config in keys:
            value, facts = bench.run(unets[mode], config, args.steps, args.subjects, args.size)
            seconds[(mode, config)].append(value)
            results[f"{mode}/{config}"].update(facts)
    for (mode, config), values in seconds.items():
        entry = results[f"{mode}/{config}"]
        entry["seconds_per_image"] = round(statistics.median(values), 4)
        entry["all_rounds"] = [round(v, 4) for v in values]
    for mode in unets:
        stock = results.get(f"{mode}/stock", {}).get("seconds_per_image")
        peer = results.get(f"{mode}/peer", {}).get("seconds_per_image")
        anyms = results.get(f"{mode}/anyms", {}).get("seconds_per_image")
        for config in args.configs:
            entry = results.get(f"{mode}/{config}")
            if not entry or "seconds_per_image" not in entry:
                continue
            if stock:
                entry["ratio_vs_stock"] = round(entry["seconds_per_image"] / stock, 3)
            if peer:
                entry["ratio_vs_peer"] = round(entry["seconds_per_image"] / peer, 3)
            if anyms and config == "anyms+rec":
                entry["ratio_vs_anyms"] = round(entry["seconds_per_image"] / anyms, 3)
            if mode != "eager" and f"eager/{config}" in results:
                entry["ratio_vs_eager"] = round(entry["seconds_per_image"] / results[f"eager/{config}"]["seconds_per_image"], 3)
            print(f"{mode:<10} {config:<10} {json.dumps(entry)}", flush=True)
    return results


def section_scaling(bench: Bench, args) -> dict:
    results = {"subjects": {}, "size": {}}
    points = [("subjects", n, args.size) for n in args.scaling_subjects] + [("size", args.subjects, s) for s in args.scaling_sizes]
    for config in ("stock", "peer", "anyms"):  # warm-up
        bench.run(bench.unet, config, 1, args.subjects, args.size)
    seconds = {(axis, n, s, c): [] for axis, n, s in points for c in ("stock", "peer", "anyms")}
    for _ in range(args.rounds):
        for axis, n, s, c in seconds:
            seconds[(axis, n, s, c)].append(bench.run(bench.unet, c, args.scaling_steps, n, s)[0])
    for (axis, n, s, c), values in seconds.items():
        results[axis].setdefault(str(n if axis == "subjects" else s), {})[c] = round(statistics.median(values) / args.scaling_steps, 5)
    for axis in ("subjects", "size"):
        print(f"scaling vs {axis} (eager, median seconds per UNet call; anyms/stock, anyms/peer):")
        for point, entry in results[axis].items():
            print(f"  {axis}={point:>5}: stock {entry['stock']:.4f}  peer {entry['peer']:.4f}  anyms {entry['anyms']:.4f}  "
                  f"x{entry['anyms'] / entry['stock']:.3f} stock  x{entry['anyms'] / entry['peer']:.3f} peer", flush=True)
    return results


def build_pipeline(device: str, dtype: torch.dtype, tiny: bool):
    """A whole SDXL pipeline with random weights at the real sizes (or the tiny one), with a random IP-Adapter."""
    if tiny:
        from anyms_core.testing import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline().to(device)
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    from anyms_core.testing import tiny_tokenizer

    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            layers_per_block=2, sample_size=1024, scaling_factor=0.13025)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                            projection_dim=768, hidden_act="quick_gelu"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                            num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                                                                       num_attention_heads=16, image_size=224, patch_size=14,
                                                                       projection_dim=1280, hidden_act="gelu"))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        image_encoder=image_encoder, feature_extractor=CLIPImageProcessor(size=224, crop_size=224),
    )
    pipe.load_ip_adapter(random_ip_adapter_state_dict(unet, image_embed_dim=1280, std=0.02), subfolder="", weight_name="",
                         image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def section_pipeline(bench: Bench, args) -> dict:
    pipe = build_pipeline(bench.device, bench.dtype, bench.tiny)
    size = 64 if bench.tiny else 1024
    subjects = [Subject(_blank(), box, name=f"s{i}") for i, box in enumerate(BOXES[: args.subjects])]

    def call(config: str) -> float:
        session_context = contextlib.nullcontext() if config == "stock" else decoupled(pipe, subjects, variant=config)
        with session_context:
            bench.sync()
            start = time.perf_counter()
            pipe("a photo", ip_adapter_image=[[s.image for s in subjects]], num_inference_steps=args.steps, height=size,
                 width=size, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
            bench.sync()
            return time.perf_counter() - start

    results = {}
    for config in ("stock", "anyms"):
        call(config)  # warm-up
    seconds = {"stock": [], "anyms": []}
    for _ in range(args.rounds):
        for config in seconds:
            if bench.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds[config].append(call(config))
            if bench.device == "cuda":
                results.setdefault(config, {})["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    for config, values in seconds.items():
        results.setdefault(config, {})["seconds_per_image"] = round(statistics.median(values), 3)
        results[config]["all_rounds"] = [round(v, 3) for v in values]
    print(f"end-to-end {size}x{size}, {args.steps} steps, {args.subjects} subjects: {json.dumps(results)}", flush=True)
    del pipe
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny random SDXL instead of the full one (a smoke test on CPU)")
    parser.add_argument("--sections", nargs="+", default=["unet", "scaling", "pipeline"], choices=["unet", "scaling", "pipeline"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--compiled-configs", nargs="+", default=["stock", "peer", "anyms", "anyms+rec"], choices=CONFIGS,
                        help="configurations also timed with torch.compile (each compiles its own graphs)")
    parser.add_argument("--cudagraph-configs", nargs="+", default=["stock", "anyms"], choices=CONFIGS,
                        help="configurations also timed with CUDA graphs (mode reduce-overhead)")
    parser.add_argument("--compile-backend", default="inductor", help="for mode `compile` (e.g. aot_eager for a quick CPU smoke test)")
    parser.add_argument("--scaling-subjects", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--scaling-sizes", type=int, nargs="+", default=[512, 768, 1024, 1280, 1536])
    parser.add_argument("--scaling-steps", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.device != "cuda":
        args.modes = [m for m in args.modes if m != "cudagraphs"]  # CUDA graphs need CUDA
    bench = Bench(args.device, args.tiny)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"{machine}, torch {torch.__version__}, {'tiny' if args.tiny else 'full'} SDXL, {args.size}x{args.size}, "
          f"{args.steps} steps, {args.subjects} subjects, {args.rounds} rounds", flush=True)
    report = {"device": machine, "torch": torch.__version__, "tiny": args.tiny, "steps": args.steps, "size": args.size,
              "subjects": args.subjects, "rounds": args.rounds}
    for section in args.sections:
        report[section] = {"unet": section_unet, "scaling": section_scaling, "pipeline": section_pipeline}[section](bench, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
