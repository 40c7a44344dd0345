"""``autoskd plan``: which layouts fit, and the DeepSpeed config + launch command of the best.

Registered in :mod:`autoskd.cli` with ``add_plan_parser(sub)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_types import float_range, output_dir, output_file, positive_int
from .errors import AutoSKDError


def _ints(text: str, name: str, minimum: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < minimum:
        raise AutoSKDError(f"--{name} must be integers >= {minimum} separated by commas (got '{text}')")
    return values


def _choices(text: str, allowed, name: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(","))
    bad = [v for v in values if v not in allowed]
    if bad:
        raise AutoSKDError(f"--{name}: unknown {', '.join(bad)}; use one or more of {', '.join(allowed)}")
    return values


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory planner: which MP/DP/ZeRO/offload layouts fit, fastest first")
    p.add_argument("--teacher", required=True,
                   help="table-8 size (100B, 10B, 110M, ...), a Llama name (llama3-70b, llama3-8b, llama3.2-1b, "
                        "llama2-7b, ...), HF config (alias, folder, config.json, hub id) or layers=L,hidden=H,vocab=V "
                        "(+kv_heads=K,gated=1,tied=0 for a Llama-shaped decoder)")
    p.add_argument("--student", required=True, help="same forms as --teacher")
    p.add_argument("--teacher-layers", type=positive_int, metavar="K", help="keep the first k layers of the teacher")
    p.add_argument("--student-layers", type=positive_int, metavar="K", help="keep the first k layers of the student")
    p.add_argument("--gpus", type=positive_int, default=1, metavar="N", help="devices (MP x DP); default 1")
    p.add_argument("--gpu-memory", default="40GB", help="memory per device, e.g. 40GB, 80GB (GB = GiB)")
    p.add_argument("--host-memory", help="CPU memory of the node; offload layouts needing more are rejected")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (default) or cpu ranks")
    p.add_argument("--micro-batch", default="1", help="micro-batch sizes to try, comma-separated (default 1)")
    p.add_argument("--seq-len", default="512", help="sequence lengths to try (default 512)")
    p.add_argument("--precision", help="fp16,bf16,fp32 to try (default fp16 on cuda, fp32 on cpu)")
    p.add_argument("--zero", default="0,1,2,3", help="ZeRO stages to try (default 0,1,2,3)")
    p.add_argument("--offload", default="none,optimizer,optimizer+params", help="offloads to try")
    p.add_argument("--mp", help="model-parallel degrees to try (default: every divisor of --gpus)")
    p.add_argument("--checkpointing", default="both", choices=["both", "on", "off"],
                   help="student activation checkpointing (default: try both)")
    p.add_argument("--features", choices=["classifier", "hidden", "tinybert", "lm-logits"],
                   help="what the loss reads from the teacher (default: lm-logits, next-token distributions, when "
                        "both models are decoders; else tinybert: hidden states + attention maps)")
    p.add_argument("--top-k", default="0", metavar="K[,K]",
                   help="LM teachers: 0 = live teacher, k = served from a top-k cache (6k bytes/token on disk) "
                        "filled by one teacher pass first; comma-separate to compare, e.g. 0,64 (default 0)")
    p.add_argument("--fragmentation", type=float_range(at_least=0, below=1), default=0.10, metavar="F",
                   help="allocator reserve above the peak, in [0, 1) (default 0.10)")
    p.add_argument("--top", type=positive_int, metavar="N", help="print at most N layouts per section (default: all)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--out", type=output_dir, metavar="DIR", help="folder for plan.json and plan.png")
    p.add_argument("--plot", type=output_file, metavar="PNG", help="where to save the memory-per-component plot (PNG)")
    p.add_argument("--emit-deepspeed", type=output_file, metavar="PATH",
                   help="write the best layout's DeepSpeed config here and print the launch command")
    p.add_argument("--team", default="TEAM.yaml", help="team YAML named in the printed launch command")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner import Hardware, cpu_hardware, parse_memory, plan, resolve_shape
    from .planner.deepspeed_config import launch_command, write_deepspeed_config
    from .planner.report import format_plan, plot_plan

    if args.top is not None and args.top < 1:
        raise AutoSKDError(f"--top must be a positive integer (got {args.top})")
    if args.gpus < 1:
        raise AutoSKDError(f"--gpus must be a positive integer (got {args.gpus})")
    if not 0 <= args.fragmentation < 1:
        raise AutoSKDError(f"--fragmentation must be in [0, 1) (got {args.fragmentation})")
    memory = parse_memory(args.gpu_memory)
    host = parse_memory(args.host_memory) if args.host_memory else None
    if args.device == "cuda":
        hw = Hardware(memory_bytes=memory, fragmentation=args.fragmentation, host_memory_bytes=host)
    else:
        hw = cpu_hardware(memory)
    precisions = _choices(args.precision or ("fp16" if args.device == "cuda" else "fp32"),
                          ("fp16", "bf16", "fp32"), "precision")
    zero = _ints(args.zero, "zero", minimum=0)
    if max(zero) > 3:
        raise AutoSKDError(f"--zero stages are 0..3 (got '{args.zero}')")
    mps = _ints(args.mp, "mp") if args.mp else None
    if mps and any(args.gpus % m for m in mps):
        raise AutoSKDError(f"--mp degrees must divide --gpus {args.gpus} (got '{args.mp}')")
    top_ks = _ints(args.top_k, "top-k", minimum=0)
    teacher = resolve_shape(args.teacher, layers=args.teacher_layers)
    student = resolve_shape(args.student, layers=args.student_layers)
    features = args.features or ("lm-logits" if teacher.decoder and student.decoder else "tinybert")
    if any(top_ks) and features != "lm-logits":
        raise AutoSKDError(f"--top-k serves next-token distributions of LM teachers; use --features lm-logits "
                           f"(got --features {features})")
    result = plan(teacher, student, gpus=args.gpus, hardware=hw,
                  micro_batches=_ints(args.micro_batch, "micro-batch"), seq_lens=_ints(args.seq_len, "seq-len"),
                  precisions=precisions, zero_stages=zero,
                  offloads=_choices(args.offload, ("none", "optimizer", "optimizer+params"), "offload"),
                  checkpointing={"both": (True, False), "on": (True,), "off": (False,)}[args.checkpointing],
                  mp_degrees=mps, features=features, top_ks=top_ks)
    payload = result.to_dict()
    plot_path = Path(args.plot) if args.plot else (Path(args.out) / "plan.png" if args.out else None)
    if plot_path:
        payload["plot"] = str(plot_plan(result, plot_path))
    if args.emit_deepspeed:
        if result.best is None:
            raise AutoSKDError("no layout fits, so there is no DeepSpeed config to emit; add GPUs, "
                               "allow offload, or shorten --seq-len")
        layout = result.best.estimate.layout
        path = write_deepspeed_config(layout, args.emit_deepspeed)
        payload["deepspeed_config"] = str(path)
        payload["launch_command"] = launch_command(layout, path, team=args.team)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "plan.json").write_text(json.dumps(payload, indent=2) + "\n")
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    print(format_plan(result, top=args.top))
    if plot_path:
        print(f"plot: {payload['plot']}")
    if args.emit_deepspeed:
        print(f"DeepSpeed config: {payload['deepspeed_config']}")
        print(f"launch: {payload['launch_command']}")
    return 0

