"""GKD's measured memory (tables 3 and 5 of the GKD paper; 8 x A100-40GB, TinyBERT pre-training
stage, micro-batch 1, fp16): what the planner is checked against.

Each row: (table, teacher size, student size, MP, DP, ZeRO, offload, max allocated GiB or None
for "GPU memory overflow"). ZeRO "✓" is stage 1, "✓†" stage 2 (gradients partitioned too);
Offload "✓" moves the optimizer states to the CPU ("✓†" also the gradients; DeepSpeed's
``offload_optimizer`` does both, so both map to ``offload="optimizer"``).
"""

from __future__ import annotations

ROWS: list[tuple] = [
    ("3", "110M", "22M", 1, 8, 0, False, 0.99), ("3", "110M", "66M", 1, 8, 0, False, 1.73),
    ("3", "340M", "66M", 1, 8, 0, False, 3.11), ("3", "5B", "1B", 1, 8, 0, False, 32.44),
    ("3", "6B", "1.2B", 1, 8, 0, False, None), ("3", "6B", "1.2B", 2, 4, 0, False, 18.91),
    ("3", "7.5B", "1.5B", 2, 4, 0, False, 24.22), ("3", "10B", "2B", 2, 4, 0, False, 30.91),
    ("3", "10B", "2B", 2, 4, 1, False, 18.45), ("3", "10B", "2B", 2, 4, 1, True, 15.83),
    ("3", "25B", "5B", 8, 1, 0, False, 20.41), ("3", "50B", "10B", 8, 1, 1, True, 17.93),
    ("3", "65B", "13B", 8, 1, 1, True, 22.48), ("3", "90B", "18B", 8, 1, 1, True, 30.56),
    ("3", "100B", "20B", 8, 1, 1, True, 33.62), ("3", "110B", "22B", 8, 1, 1, True, None),
]

_TABLE5 = {  # (teacher, student): [((zero, offload), MA for MP 1, 2, 4, 8 with DP = 8 / MP)]
    ("5B", "1B"): [((2, True), (17.65, 9.07, 4.87, 2.72)), ((1, True), (17.65, 9.06, 4.87, 2.72)),
                   ((2, False), (18.92, 10.44, 6.31, 4.23)), ((1, False), (18.92, 10.43, 6.31, 4.23)),
                   ((0, False), (32.44, 16.34, 8.31, 4.27))],
    ("10B", "2B"): [((2, True), (30.73, 15.84, 8.41, 4.70)), ((1, True), (30.73, 15.83, 8.41, 4.70)),
                    ((2, False), (33.23, 18.46, 11.11, 7.53)), ((1, False), (33.23, 18.45, 11.11, 7.53)),
                    ((0, False), (None, 30.91, 15.64, 8.00))],
}
for (_t, _s), _blocks in _TABLE5.items():
    for (_z, _o), _vals in _blocks:
        for _mp, _ma in zip((1, 2, 4, 8), _vals):
            ROWS.append(("5", _t, _s, _mp, 8 // _mp, _z, _o, _ma))

#: Sequence length assumed: GLM's (and GKD's) ``--seq-length`` default, 512 tokens; GKD ran
#: with ``--checkpoint-activations`` (their distill/readme.md) and TinyBERT's intermediate-layer
#: loss (hidden states + attention maps of the mapped layers).
SEQ_LEN = 512
