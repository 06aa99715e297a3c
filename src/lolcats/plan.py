"""Memory planner: per-GPU bytes of each linearization stage, before anything is loaded.

Estimates, not measurements: weights and optimizer state are exact counts; activations use the
usual per-token accounting (Korthikanti et al. 2022, without attention matrices, which the hybrid
never materialises) plus the hybrid's own intermediates, with the terms set from the peaks
measured on one H200 (Llama-3-8B shape, both stages, with and without activation checkpointing,
reports/bench/training/): there the totals are within 3% (tests/test_plan.py checks 10%).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from lolcats.config import LolcatsConfig
from lolcats.loading import EMBEDDED_DEFAULT as EMBEDDED
from lolcats.loading import GEMMA3

GIB = 1024**3

# Shapes of common bases, so planning needs no download: (layers, hidden, heads, kv heads, head_dim, ffn, vocab)
PRESETS = {
    "llama3-8b": (32, 4096, 32, 8, 128, 14336, 128256),
    "llama3-70b": (80, 8192, 64, 8, 128, 28672, 128256),
    "llama3.1-405b": (126, 16384, 128, 8, 128, 53248, 128256),
    "smollm2-135m": (30, 576, 9, 3, 64, 1536, 49152),
}


@dataclass
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", heads) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            ffn=config.intermediate_size, vocab=config.vocab_size,
        )

    @property
    def params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.ffn
        return self.layers * (attn + mlp + 2 * self.hidden) + self.hidden + 2 * self.vocab * self.hidden


@dataclass
class StagePlan:
    stage: str
    weights: int
    trainable: int
    optimizer_and_grads: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer_and_grads + self.activations

    def row(self) -> dict:
        return {**asdict(self), "total": self.total}


def plan(
    shape: ModelShape, *, gpus: int = 1, tokens_per_gpu: int = 4096, config: LolcatsConfig | None = None,
    lora_r: int = 8, weight_bytes: int = 2, activation_checkpointing: bool = False,
) -> list[StagePlan]:
    """Per-GPU bytes for stage 1 (attention transfer) and stage 2 (LoRA) under FSDP over `gpus`."""
    cfg = config or LolcatsConfig()
    F2 = 2 * cfg.feature_dim
    key_heads = shape.heads if cfg.key_map_sharing == "query" else shape.kv_heads
    phi = shape.layers * (shape.head_dim * cfg.feature_dim * (shape.heads + key_heads) + shape.heads)
    lora = shape.layers * lora_r * (
        2 * shape.hidden + 2 * (shape.hidden + shape.kv_heads * shape.head_dim)  # q,o + k,v
        + (shape.heads * shape.head_dim - shape.hidden)
    )
    weights = shape.params * weight_bytes // gpus  # frozen base, sharded
    adam = 16  # fp32 master value, grad, two moments per trainable parameter

    T, h = tokens_per_gpu, shape.hidden
    C, w = cfg.chunk_size, cfg.window_size
    q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # hybrid intermediates kept for backward, per token and layer (fp32): q/k features,
    # window scores over C + w keys, intra-chunk linear scores, chunk states amortised over C
    hybrid = 4 * (shape.heads * F2 * 2 + shape.heads * (C + w) + shape.heads * C
                  + key_heads * F2 * shape.head_dim // max(C, 1))
    # stage 1 keeps, per layer, the student's graph: the hybrid's intermediates, its inputs q, k, v
    # and the teacher's output it is compared with (fp32); each hangs off frozen teacher inputs
    student = hybrid + weight_bytes * (q_size + 2 * kv_size) + 4 * q_size
    # a whole layer's activations for backprop (Korthikanti et al.'s 34 h bytes in 16 bit) + the hybrid
    full_layer = 34 * h + hybrid
    layer_input = weight_bytes * h  # all a checkpointed layer keeps until its recompute
    logits = T * shape.vocab * 10  # 16-bit logits, their fp32 copy for the loss, and its gradient
    checkpointed = T * (layer_input * shape.layers + full_layer)  # the layers' inputs + one layer recomputed
    # under FSDP (gpus > 1) lolcats checkpoints stage 2 only: stage 1's loss is inside the layers
    stage1_act = checkpointed if activation_checkpointing and gpus == 1 else T * student * shape.layers
    stage2_act = (checkpointed if activation_checkpointing else T * full_layer * shape.layers) + logits
    return [
        StagePlan("stage1 (attention transfer)", weights, phi, phi * adam // gpus, stage1_act),
        StagePlan("stage2 (LoRA)", weights, lora, lora * adam // gpus, stage2_act),
    ]


def decode_state_bytes(shape: ModelShape, config: LolcatsConfig | None = None, kv_bytes: int = 2) -> int:
    """Bytes of the decode state of one sequence: float32 (S, z), the newest keys/values (w, or
    w + P - 1 with a global cache), their pre-RoPE keys with position-free maps, sinks, global cache."""
    cfg = config or LolcatsConfig()
    key_heads = shape.heads if cfg.key_map_sharing == "query" else shape.kv_heads
    F2 = 2 * cfg.feature_dim
    state = key_heads * (F2 * shape.head_dim + F2) * 4
    slot = shape.kv_heads * shape.head_dim * kv_bytes  # one token's key (or value) over the KV heads
    key_inputs = 0 if cfg.feature_map_rope else 1  # a pre-RoPE key per buffered token
    mem = cfg.memory
    wb = cfg.window_size + mem.period - 1
    window = (2 + key_inputs) * slot * wb + wb
    sinks = cfg.sink_size * (2 * slot + 8)  # keys, values, int64 positions
    cache = cfg.global_cache_size * ((2 + key_inputs) * slot + shape.kv_heads * 9)  # + validity, int64 positions
    return shape.layers * (state + window + sinks + cache)


def resolve_shape(model: str | None) -> ModelShape:
    if model in PRESETS:
        return ModelShape(*PRESETS[model])
    from transformers import AutoConfig

    from lolcats.loading import _from_pretrained_args, resolve_source

    _, local = resolve_source(model)
    where, extra = _from_pretrained_args(local)
    return ModelShape.from_config(AutoConfig.from_pretrained(where, trust_remote_code=False, **extra))


def format_plan(rows: list[StagePlan], gpus: int, gpu_gib: float) -> str:
    lines = [
        f"| stage | weights | trainable params | optimizer+grads | activations | total per GPU | fits {gpu_gib:.0f} GiB x {gpus} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fits = "yes" if r.total <= gpu_gib * GIB * 0.9 else "NO"
        lines.append(
            f"| {r.stage} | {r.weights / GIB:.2f} GiB | {r.trainable:,} | {r.optimizer_and_grads / GIB:.3f} GiB "
            f"| {r.activations / GIB:.2f} GiB | {r.total / GIB:.2f} GiB | {fits} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI: lolcats plan MODEL --gpus N


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="estimate per-GPU memory of both stages before running them",
        description="Estimate, before anything is loaded, the per-GPU memory of stage 1 (attention transfer) "
                    "and stage 2 (LoRA) under FSDP over N GPUs: weights, trainable parameters, optimizer state "
                    "and gradients, activations; and the decode state of one sequence. Estimates, checked "
                    "against measured H200 peaks (within 3% on the Llama-3-8B shape).",
    )
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help=f"HF folder, .gguf, {EMBEDDED} (the default) or {GEMMA3}, or a shape preset: "
                        f"{', '.join(PRESETS)} (no download)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="GPUs the frozen base is sharded over (FSDP; default 1)")
    p.add_argument("--gpu-memory-gib", type=float, default=141.0, metavar="GIB",
                   help="memory of one GPU, for the 'fits' column (default 141, an H200)")
    p.add_argument("--tokens-per-gpu", type=int, default=4096, metavar="N",
                   help="tokens per micro-batch on each GPU (default 4096)")
    p.add_argument("--feature-dim", type=int, default=64, metavar="N", help="feature map width f (default 64)")
    p.add_argument("--window", type=int, default=64, metavar="N", help="sliding softmax window in tokens (default 64)")
    p.add_argument("--key-maps", choices=["query", "kv"], default="query",
                   help="one key feature map per query head (query, default) or per KV head (kv)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="as linearize --activation-checkpointing: both stages on 1 GPU, stage 2 only under FSDP")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    if args.gpus < 1:
        print("lolcats plan: error: --gpus must be >= 1", file=sys.stderr)
        return 2
    try:
        shape = resolve_shape(args.model)
    except (OSError, ValueError) as e:
        print(f"lolcats plan: error: {e}", file=sys.stderr)
        return 2
    cfg = LolcatsConfig(window_size=args.window, feature_dim=args.feature_dim, key_map_sharing=args.key_maps)
    rows = plan(shape, gpus=args.gpus, tokens_per_gpu=args.tokens_per_gpu, config=cfg,
                activation_checkpointing=args.activation_checkpointing)
    print(format_plan(rows, args.gpus, args.gpu_memory_gib))
    # the window's keys/values are in the model dtype: bfloat16 on CUDA, float32 on CPU (as lolcats bench state)
    print(f"decode state per sequence: {decode_state_bytes(shape, cfg) / 2**20:.1f} MiB in bfloat16 (GPU), "
          f"{decode_state_bytes(shape, cfg, kv_bytes=4) / 2**20:.1f} MiB in float32 (CPU)")
    host = shape.params * 2 / GIB  # the base loaded in 16 bit
    print(f"host memory to load the base: {host:.1f} GiB on rank 0 under --fsdp (the other ranks build it on "
          f"the meta device), {host * args.gpus:.1f} GiB in all without --fsdp (one copy per process)")
    return 0
