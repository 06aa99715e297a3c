"""Training throughput and memory of stage 1 (attention transfer) or stage 2 (LoRA) on one or
several GPUs (data parallel, optionally FSDP2), through the real training loop.

    # stage 1 on one GPU, then two (data parallel): Llama-3-8B shapes, random bf16 weights
    PYTHONPATH=src python3 scripts/gpu/bench_training.py --out $OUT/stage1_8b_ngpu1.json
    PYTHONPATH=src torchrun --standalone --nproc_per_node 2 scripts/gpu/bench_training.py \
        --out $OUT/stage1_8b_ngpu2.json
    # stage 2 (LoRA r 8 on q/k/v/o) with and without activation checkpointing
    PYTHONPATH=src python3 scripts/gpu/bench_training.py --stage 2 --micro-batch 4 --activation-checkpointing
    # SmolLM2's shape, stage 2: the default memory (--memory long), the paper's conversion, and the
    # control (the same LoRA on the softmax model); LOLCATS_BACKEND=torch: the memory's form all eager
    # (no CUDA graph); its exact terms run by kernels (ops/hybrid/interval.py) unless LOLCATS_MEMORY_KERNEL=0,
    # and with them off LOLCATS_COMPILE=1 runs its differentiable part through torch.compile
    PYTHONPATH=src python3 scripts/gpu/bench_training.py --preset smollm2-135m --stage 2
    PYTHONPATH=src python3 scripts/gpu/bench_training.py --preset smollm2-135m --stage 2 --memory none
    PYTHONPATH=src python3 scripts/gpu/bench_training.py --preset smollm2-135m --stage 2 --control
    # a base that does not fit one GPU: Llama-3-70B shapes sharded over 4 GPUs (FSDP2)
    PYTHONPATH=src torchrun --standalone --nproc_per_node 4 scripts/gpu/bench_training.py \
        --preset llama3-70b --fsdp --micro-batch 1 --out $OUT/stage1_70b_fsdp4.json
    # check the script on CPU (gloo)
    PYTHONPATH=src torchrun --standalone --nproc_per_node 2 scripts/gpu/bench_training.py \
        --preset smollm2-135m --layers 2 --device cpu --steps 2 --warmup 1 --block-size 128

Each process builds the same random-weight Llama of the preset's shape (`random_causal_lm`; with
--fsdp built on the meta device, sharded per decoder layer, then materialised shard by shard),
`lolcats.convert`s it (the --memory preset, default as `lolcats linearize`) and runs
`lolcats.train.train` on random token blocks: stage 1 with `TransferLoss` (AdamW on phi/gamma),
stage 2 with `add_lora` + `causal_lm_loss` (phi/gamma frozen; --control: the same LoRA on the
softmax model, the converted layers in softmax mode),
gradient clipping, bf16 autocast on CUDA; --activation-checkpointing as in
`lolcats linearize` (stage 1 not under --fsdp). A step takes world_size x micro-batch x
grad-accum blocks (each rank its own micro-batch); gradients are averaged across ranks.
Throughput = tokens of all ranks over the steps after --warmup, divided by their wall time (each
step ends with a device sync). Peak memory is per rank (torch.cuda.max_memory_allocated). Rank 0
prints a markdown table row and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

# NVLink multicast stays off (it can take a shared host's GPUs out of service); keep it so here too
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # run from a checkout without installing

from lolcats import LolcatsConfig, convert  # noqa: E402
from lolcats.attention.layer import set_mode  # noqa: E402
from lolcats.config import DEFAULT_MEMORY, MEMORY_PRESETS  # noqa: E402
from lolcats.bench.common import dtype_name, environment, peak_memory, reset_peak_memory, resolve_dtype, sync  # noqa: E402
from lolcats.data import TokenBlocks  # noqa: E402
from lolcats.fileio import atomic_write_json  # noqa: E402
from lolcats.ops.backend import compile_enabled, memory_kernel_enabled  # noqa: E402
from lolcats.compat import enable_activation_checkpointing  # noqa: E402
from lolcats.train import TrainConfig, TransferLoss, add_lora, causal_lm_loss, lora_parameters, train  # noqa: E402
from lolcats.train import transfer_parameters  # noqa: E402
from lolcats.train import distributed  # noqa: E402

HEADER = ("| stage | model | preset | layers | GPUs | FSDP | act. ckpt | block x micro-batch x accum | tokens/s (all) | tokens/s per GPU "
          "| s/step | peak GiB per rank (max) | model GiB per rank |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2], default=1, help="1: attention transfer, 2: LoRA")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute decoder layers in backward (stage 1: not with --fsdp)")
    p.add_argument("--preset", default="llama3-8b", help="model shape (lolcats.plan.PRESETS), default llama3-8b")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the preset (smoke tests)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="weights dtype and autocast (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--block-size", type=int, default=1024, help="tokens per block (1024 or 2048 on GPU)")
    p.add_argument("--micro-batch", type=int, default=8, help="blocks per forward pass per GPU (default 8, as the CUDA preset)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="measured optimiser steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="steps not measured (Triton compilation, allocator)")
    p.add_argument("--fsdp", action="store_true", help="shard the frozen base over the ranks (FSDP2)")
    p.add_argument("--key-maps", choices=["query", "kv"], default="query", help="key feature map per query or KV head")
    p.add_argument("--memory", choices=sorted(MEMORY_PRESETS), default=DEFAULT_MEMORY,
                   help=f"memory preset of the conversion (default {DEFAULT_MEMORY!r}, as lolcats linearize)")
    p.add_argument("--control", action="store_true",
                   help="stage 2 on the softmax model (LoRA alone): what stage 2's throughput is compared with")
    p.add_argument("--lr", type=float, default=None, help="default 1e-2 (stage 1), 1e-4 (stage 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="torch.profiler over N steps after --warmup: the top ops by device time printed and "
                        "saved in the JSON (the profiled steps count in the throughput: not comparable)")
    p.add_argument("--out", default=None, help="JSON file (default $OUT/stage1_<preset>_ngpu<N>[_fsdp].json if $OUT is set)")
    args = p.parse_args(argv)
    if args.profile > args.steps or args.profile < 0:
        p.error("--profile N takes N of the measured --steps (0 <= N <= --steps)")
    if args.steps < 1 or args.warmup < 0 or args.micro_batch < 1 or args.grad_accum < 1 or args.block_size < 2:
        p.error("--steps, --micro-batch, --grad-accum must be >= 1, --warmup >= 0, --block-size >= 2")
    if args.control and args.stage != 2:
        p.error("--control is stage 2's comparison (LoRA on the softmax model): use it with --stage 2")
    return args


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The preset's random-weight Llama on `device`; with --fsdp sharded before it is materialised."""
    from lolcats.bench.models import preset_config, random_causal_lm

    if not args.fsdp:
        return random_causal_lm(args.preset, dtype=dtype, device=device, num_layers=args.layers, seed=args.seed)
    from transformers import LlamaForCausalLM

    config = preset_config(args.preset, num_layers=args.layers)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    distributed.shard_model(model, device=device, param_dtype=torch.bfloat16 if dtype == torch.bfloat16 else None)
    model.to_empty(device=device)  # each rank allocates only its shards (+ the whole LM head)
    gen = torch.Generator(device=device).manual_seed(args.seed + distributed.rank())
    with torch.no_grad():
        for _, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if p.ndim == 1:  # RMSNorm weights
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=gen)
        # to_empty left the rotary buffers uninitialised: build that small module afresh
        model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model.eval()


def gather(value: Any) -> list[Any]:
    if distributed.world_size() <= 1:
        return [value]
    out: list[Any] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = distributed.init(args.device)  # under torchrun: process group + cuda:LOCAL_RANK
    world, rank = distributed.world_size(), distributed.rank()
    if args.fsdp and world < 2:
        raise SystemExit("--fsdp shards over the processes of a torchrun launch: use torchrun --nproc_per_node N (N >= 2)")
    dtype = resolve_dtype(args.dtype, device)
    autocast = "bfloat16" if dtype == torch.bfloat16 else "float32"
    cuda = device.type == "cuda"

    torch.manual_seed(args.seed)
    model = build_model(args, device, dtype)
    convert(model, LolcatsConfig.preset(args.memory, key_map_sharing=args.key_maps))
    model_bytes = torch.cuda.memory_allocated(device) if cuda else None
    reset_peak_memory(device)
    checkpointing = args.activation_checkpointing and not (args.fsdp and args.stage == 1)
    if checkpointing:
        enable_activation_checkpointing(model)
    if args.stage == 1:
        loss_fn, params = TransferLoss(model), transfer_parameters(model)
    else:
        model = add_lora(model)  # r 8, alpha 16 on q/k/v/o; phi/gamma frozen
        if args.control:
            set_mode(model, "softmax")
        loss_fn, params = causal_lm_loss, lora_parameters(model)
    total_steps = args.warmup + args.steps
    n_blocks = world * args.micro_batch * args.grad_accum * total_steps  # every block seen once
    gen = torch.Generator().manual_seed(args.seed)  # the same blocks on every rank; each takes its slice
    ids = torch.randint(3, model.config.vocab_size, (n_blocks, args.block_size), generator=gen)
    blocks = TokenBlocks(input_ids=ids, labels=ids.clone())

    times: list[tuple[int, float]] = []  # (tokens of all ranks, seconds since start) at each step's end
    prof = None
    if args.profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        prof = torch.profiler.profile(activities=acts)
        if args.warmup == 0:
            prof.start()
    t0 = time.perf_counter()

    def callback(event: dict[str, Any]) -> None:
        if event.get("event") == "step":
            sync(device)  # the step's update is done
            times.append((int(event["tokens"]), time.perf_counter() - t0))
            if prof is not None and len(times) == args.warmup:
                prof.start()
            if prof is not None and len(times) == args.warmup + args.profile:
                prof.stop()

    lr = args.lr if args.lr is not None else (1e-2 if args.stage == 1 else 1e-4)
    tc = TrainConfig(lr=lr, max_steps=total_steps, micro_batch_size=args.micro_batch, grad_accum=args.grad_accum,
                     dtype=autocast, eval_every=0, checkpoint_every=0, log_every=total_steps, seed=args.seed)
    res = train(model, params, loss_fn, blocks, None, config=tc, callback=callback, name=f"stage{args.stage}",
                device=device)
    profile_table = None
    if prof is not None:
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=30)
        if rank == 0:
            print(profile_table)
    tok0, s0 = times[args.warmup - 1] if args.warmup > 0 else (0, 0.0)
    tok1, s1 = times[-1]
    tokens_per_s = (tok1 - tok0) / max(s1 - s0, 1e-9)
    peaks = gather(peak_memory(device))
    models = gather(model_bytes)

    if rank == 0:
        result = {
            "benchmark": "training",
            "config": {"stage": args.stage, "activation_checkpointing": checkpointing, "preset": args.preset, "layers": args.layers or model.config.num_hidden_layers,
                       "device": device.type, "weights_dtype": dtype_name(dtype), "autocast": autocast,
                       "block_size": args.block_size, "micro_batch_size": args.micro_batch,
                       "grad_accum": args.grad_accum, "warmup_steps": args.warmup, "measured_steps": args.steps,
                       "key_maps": args.key_maps, "memory": args.memory, "control": args.control,
                       "backend": os.environ.get("LOLCATS_BACKEND", "auto"),
                       "compile": compile_enabled(), "memory_kernel": memory_kernel_enabled(torch.empty(0, device=device)), "fsdp": args.fsdp, "world_size": world,
                       "tokens_per_step": world * args.micro_batch * args.grad_accum * args.block_size},
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / world,
            "seconds_per_step": (s1 - s0) / args.steps, "warmup_seconds": s0,
            "peak_memory_bytes_per_rank": peaks, "model_memory_bytes_per_rank": models,
            "trainable_parameters": sum(p.numel() for p in params.values()),
            "final_loss": res.final_train_loss, "nonfinite_steps": res.nonfinite_steps,
            "env": environment(device), "profile": profile_table, "profiled_steps": args.profile,
        }
        gib = 2**30
        peak = f"{max(peaks) / gib:.1f}" if cuda else "-"
        mod = f"{max(models) / gib:.1f}" if cuda else "-"
        print(HEADER)
        what = "softmax + LoRA (control)" if args.control else f"memory {args.memory}, backend {result['config']['backend']}"
        print(f"| {args.stage} | {what} | {args.preset} | {result['config']['layers']} | {world} | {'yes' if args.fsdp else 'no'} "
              f"| {'yes' if checkpointing else 'no'} "
              f"| {args.block_size} x {args.micro_batch} x {args.grad_accum} | {tokens_per_s:,.0f} "
              f"| {tokens_per_s / world:,.0f} | {result['seconds_per_step']:.3f} | {peak} | {mod} |", flush=True)
        out = args.out
        if out is None and os.environ.get("OUT"):
            out = str(Path(os.environ["OUT"]) / (f"stage{args.stage}_{args.preset}_ngpu{world}{'_fsdp' if args.fsdp else ''}"
                                                 f"{'_ac' if checkpointing else ''}_{'control' if args.control else args.memory}.json"))
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out, result)
    distributed.barrier()
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
