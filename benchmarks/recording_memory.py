"""Recording memory for SDXL at 1024x1024, 30 steps, 5 subjects, from the real layer shapes.

Feeds the recorder exactly what the processors hand it on SDXL (70 cross-attention layers: 10 on the
64x64 grid, 60 on the 32x32 grid; affinity and contribution for 5 subjects) and prints what each
aggregation policy stores, against the default 64 MB budget.

    python benchmarks/recording_memory.py
"""

from __future__ import annotations

import warnings

import torch

from anyms_core.recording import AttentionRecorder, RecordConfig

LAYERS = [(f"down_blocks.1.attentions.{i // 2}.transformer_blocks.{i % 2}.attn2", 64) for i in range(4)] + \
         [(f"up_blocks.1.attentions.{i // 2}.transformer_blocks.{i % 2}.attn2", 64) for i in range(6)] + \
         [(f"down_blocks.2.attentions.{i // 10}.transformer_blocks.{i % 10}.attn2", 32) for i in range(20)] + \
         [(f"mid_block.attentions.0.transformer_blocks.{i}.attn2", 32) for i in range(10)] + \
         [(f"up_blocks.0.attentions.{i // 10}.transformer_blocks.{i % 10}.attn2", 32) for i in range(30)]


def main() -> None:
    assert len(LAYERS) == 70
    print("SDXL 1024x1024, 30 steps, 5 subjects, kinds affinity + contribution, budget 64 MB")
    for policy in ("resolution", "mean", "layer"):
        recorder = AttentionRecorder(RecordConfig(policy=policy), [f"s{i}" for i in range(5)], {})
        for _ in range(30):
            recorder.begin_step(batch_size=2, guided=True)
            for name, side in LAYERS:
                for kind in ("affinity", "contribution"):
                    recorder.add(name, kind, torch.rand(side * side, 5), (side, side))
        with warnings.catch_warnings(record=True):
            maps = recorder.finish()
        default = " (default)" if policy == RecordConfig().policy else ""
        print(f"  policy={policy:<10}{default:<10} stored {maps.nbytes / 2**20:7.2f} MB, "
              f"{len(maps.entries)} maps kept, {len(maps.dropped)} dropped by the budget")


if __name__ == "__main__":
    main()
