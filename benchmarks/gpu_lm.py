"""The GPU figures the LM issues ask for, in one prepared run of a few minutes.

Issue 21: tokens/s of the cached-teacher KD step in bf16 and its fraction of the GPU's bf16
matmul rate, and the same for the teacher's forward. Issue 22: tokens/s of the AutoSKD search's
student-and-θ steps against plain sampled KD on the LM team, and ZeRO-3 on one GPU (a KD step's
tokens/s and peak memory against the same step without DeepSpeed).

Models: SmolLM2-135M-Instruct as the teacher, its 6-layer cut as the student (as
``lm_distill.py``), and ``teams/smollm2-ladder.yaml`` for the search, on the default corpus.
The matmul rate is measured here (a square bf16 matmul), not taken from a datasheet; model FLOPs
are 2 x parameters per token forward and 6 x backward-and-forward (tied embeddings counted once,
attention's T^2 term left out: at 512 tokens it is under 5% for these widths).

    python benchmarks/gpu_lm.py                  # on a CUDA machine: results/gpu_lm.json
    python benchmarks/gpu_lm.py --smoke          # tiny random models on the CPU: checks the script runs

Writes ``results/gpu_lm.json`` and ``gpu_lm.png``; where no GPU was lent they do not exist.
``--smoke`` writes only to ``--json PATH`` (and its ``.png``) when given (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from _common import write_result  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of an ``n x n`` matmul in ``dtype`` (the best of ``reps``, after a warm-up)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def rate(step, batches, repeats: int, device: torch.device) -> float:
    """Tokens/s of ``step`` over ``batches`` after one warm-up call."""
    step(batches[0])
    sync(device)
    tokens, start = 0, time.perf_counter()
    for i in range(repeats):
        batch = batches[i % len(batches)]
        step(batch)
        tokens += int(batch["attention_mask"].sum())
    sync(device)
    return tokens / (time.perf_counter() - start)


def parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def tiny_sources(root: Path) -> tuple[str, str]:
    """--smoke: a byte-level BPE tokenizer trained on the corpus and two random Llamas."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from autoskd.lm.data import load_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(load_corpus("rotten_tomatoes").split("train")[:2000],
                            trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    out = []
    for name, layers in (("teacher", 3), ("student", 1)):
        torch.manual_seed(layers)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, eos_token_id=0, bos_token_id=0))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out.append(str(root / name))
    return out[0], out[1]


def make_teams(args, root: Path):
    """(distillation team, search team YAML) for the run."""
    from autoskd.lm.team import LMMember, LMTeam

    if args.smoke:
        teacher, student = tiny_sources(root)
        team = LMTeam(student=LMMember(student), teachers={"t": LMMember(teacher)}, max_length=args.block)
        search = root / "team.yaml"
        search.write_text(f"kind: lm\nmax_length: {args.block}\nstudent: {{source: {student}}}\nteachers:\n"
                          f"  - {{name: big, source: {teacher}}}\n  - {{name: small, source: {teacher}, layers: 1}}\n"
                          f"  - {{name: adapted, source: {teacher}, train: {{method: finetune, steps: 2}}}}\n")
        return team, search
    from lm_distill import STUDENT_LAYERS

    team = LMTeam(student=LMMember("smollm2-135m", layers=STUDENT_LAYERS), teachers={"t": LMMember("smollm2-135m")},
                  max_length=args.block)
    return team, ROOT / "teams" / "smollm2-ladder.yaml"


def step_rates(args, team, corpus, device, cache_dir: Path) -> dict:
    """Teacher forward, cached KD step, CE step and the KD step under ZeRO-3 (world size 1)."""
    from autoskd.engine.trainer import Distiller, Stage
    from autoskd.lm.pipeline import LMDistillConfig, lm_loaders, lm_policy
    from autoskd.lm.recipes import decoder_method

    precision = "bf16" if device.type == "cuda" else "fp32"
    config = LMDistillConfig(method="kd", batch_size=args.batch_size, top_k=64, seed=0)
    loaders = lm_loaders(corpus, team.tokenizer, config, args.block)
    kd = decoder_method("kd")
    policy = lm_policy(team, config, kd, cache_dir)
    teacher = next(iter(policy.teachers.values()))
    teacher.to(device)
    teacher.prepare(loaders.train, loaders.train_id, device=device, progress=not args.quiet)
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
               for _, b in zip(range(4), loaders.train)]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    @torch.no_grad()
    def teacher_forward(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    out = {"precision": precision, "tokens_per_step": args.batch_size * args.block,
           "teacher_parameters": parameters(teacher.model)}
    out["teacher_forward_tokens_per_s"] = rate(teacher_forward, batches, args.repeats, device)
    layouts = {"kd": (kd, policy, None), "ce": (decoder_method("finetune"), None, None),
               "kd_zero3": (kd, policy, {"zero_optimization": {"stage": 3},
                                         **({"bf16": {"enabled": True}} if precision == "bf16" else {})})}
    for name, (method, pol, ds) in layouts.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        student = team.build_student(0)
        d = Distiller(student, method, pol, progress=False, device=device, precision="fp32" if ds else precision,
                      deepspeed=ds, checkpoint=False, restore_best=False)
        stage = Stage("task", loaders.train, lr=1e-5)
        opt, _ = d.backend.start_stage(d, stage, 10**6, d.trainable_parameters(stage))
        d.ctx.stage, d.ctx.total_steps = "task", 10**6
        out[f"{name}_step_tokens_per_s"] = rate(lambda b, d=d, opt=opt: d.train_step(b, opt, 1.0), batches,
                                                args.repeats, device)
        out[f"{name}_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        out["student_parameters"] = parameters(student)
        if ds:
            d.backend.finish(d)
    return out


def search_rates(args, search_team: Path, cache_dir: Path) -> dict:
    """The θ search (student and θ steps, lm-quick's θ settings) against plain sampled KD at the
    same steps; each run twice, the second timed (the top-k tables then come from the cache)."""
    from autoskd.lm.pipeline import distill_lm
    from autoskd.search.lm_search import LMSearchConfig, build_lm_team, corpus_of, lm_bilevel_search
    from autoskd.search.presets import get_preset

    preset = get_preset("lm-quick")
    config = LMSearchConfig(max_steps=args.search_steps, batch_size=args.batch_size, lr=preset["lr"],
                            top_k=64, theta=dict(preset["theta"]), seed=0,
                            precision="bf16" if torch.cuda.is_available() else "fp32")
    task = {"name_or_path": "lm:rotten_tomatoes", "max_train": args.max_train_docs, "max_eval": 200}
    corpus = corpus_of(task, 0)
    team = build_lm_team(search_team, task, 0, corpus, cache_dir, progress=not args.quiet)
    n = len(team.teacher_specs)
    plain = dataclasses.replace(config.base_distill(config.search_epochs), policy="sampled", theta=[1.0 / n] * n)
    seconds = {}
    for _ in range(2):
        seconds["sampled_kd"] = distill_lm(team, corpus, plain, cache_dir=cache_dir, progress=False).result.seconds
        record = lm_bilevel_search(team, corpus, config, config.theta.lr, cache_dir, progress=False)
        seconds["search"] = record["seconds"]
    tokens = record["steps"] * args.batch_size * (config.max_length or team.max_length)
    return {"teachers": n, "steps": record["steps"], "theta_steps": record["theta_steps"],
            "theta_every": config.theta.every, "order": config.theta.order,
            "search_tokens_per_s": tokens / seconds["search"], "sampled_kd_tokens_per_s": tokens / seconds["sampled_kd"],
            "search_over_sampled_kd": seconds["search"] / seconds["sampled_kd"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny random models on the CPU (checks the script runs)")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--search-steps", type=int, default=40)
    p.add_argument("--max-train-docs", type=int, default=1500)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--cache-dir", default=".cache/autoskd")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", default=None, help="--smoke: write its figures here")
    args = p.parse_args(argv)
    if args.smoke:
        args.block, args.batch_size, args.repeats, args.search_steps = 32, 4, 2, 4
        args.max_train_docs, args.matmul_n = 200, 512
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this benchmark measures a GPU (use --smoke to check it runs)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    from autoskd.lm.data import load_corpus

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache_dir = root / "cache" if args.smoke else Path(args.cache_dir)
        team, search_team = make_teams(args, root)
        team.build(seed=0, cache_dir=cache_dir, progress=not args.quiet)
        corpus = load_corpus("rotten_tomatoes", seed=0).subsample(args.max_train_docs, 250, seed=0)
        peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        peak = matmul_flops(device, peak_dtype, args.matmul_n, 5)
        steps = step_rates(args, team, corpus, device, cache_dir)
        search = search_rates(args, search_team, cache_dir)
    t, s = steps["teacher_parameters"], steps["student_parameters"]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "smoke": args.smoke, "block": args.block, "batch_size": args.batch_size,
        "matmul_tflops": peak / 1e12, "matmul_dtype": str(peak_dtype).removeprefix("torch."),
        **steps,
        "teacher_forward_matmul_fraction": 2 * t * steps["teacher_forward_tokens_per_s"] / peak,
        "kd_step_matmul_fraction": 6 * s * steps["kd_step_tokens_per_s"] / peak,
        "kd_step_over_ce_step": steps["ce_step_tokens_per_s"] / steps["kd_step_tokens_per_s"],
        "zero3_over_plain_peak_memory": (steps["kd_zero3_peak_mib"] / steps["kd_peak_mib"]
                                         if steps["kd_peak_mib"] else None),
        "search": search, "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2, default=str))
    if args.smoke:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
            plot(result, Path(args.json).with_suffix(".png"))
        return 0
    path = write_result("gpu_lm", result)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["search"]
    bars = {"teacher forward": result["teacher_forward_tokens_per_s"], "KD step (top-64 cache)":
            result["kd_step_tokens_per_s"], "CE step": result["ce_step_tokens_per_s"],
            "KD step, ZeRO-3": result["kd_zero3_step_tokens_per_s"],
            f"sampled KD, {s['teachers']} teachers": s["sampled_kd_tokens_per_s"],
            f"AutoSKD search (θ every {s['theta_every']})": s["search_tokens_per_s"]}
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(list(bars), list(bars.values()), color="#3b6ea8")
    ax.invert_yaxis()
    ax.set_xlabel(f"tokens/s ({result['precision']}, {result['batch_size']} x {result['block']} tokens)")
    ax.set_title(f"SmolLM2-135M teacher, 6-layer student on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
