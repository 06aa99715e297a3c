"""Training-form cost of the memory mechanisms on CPU: forward + backward of the chunked form.

SmolLM2's attention shape (9 query heads, 3 KV heads, head dim 64, feature dim 64, window 64), batch 2
x 1024 tokens, float32, one thread; the global cache timed both ways: every interval at once (what
training runs) and the interval loop (what a prefill that returns its state runs).

    python3 scripts/bench_memory_forms_cpu.py
"""
import time

import torch

from lolcats.attention.feature_map import hedgehog
from lolcats.attention.hybrid import Memory, hybrid_attention_chunked

torch.manual_seed(0)
torch.set_num_threads(1)
B, T, H, Hk, D, F = 2, 1024, 9, 3, 64, 64
q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hk, D), torch.randn(B, T, Hk, D)
wq, wk = torch.randn(H, D, F) * 0.1, torch.randn(H, D, F) * 0.1
gamma = torch.full((H,), 0.5)


def key_map(x):  # query key maps: one map per query head
    return hedgehog(x.repeat_interleave(H // Hk, 2), wk)


CASES = [
    ("no memory", None, False),
    ("sinks 4", Memory(4, 0, 64, 1.0), False),
    ("sinks 4 + gc128 + dedup, all intervals", Memory(4, 128, 64, 0.95), False),
    ("sinks 4 + gc128 + dedup, interval loop", Memory(4, 128, 64, 0.95), True),
]
print("| case | forward s | backward s |\n|---|---:|---:|")
for name, memory, loop in CASES:
    for _ in range(2):  # the second run is timed
        xs = [x.clone().requires_grad_() for x in (q, k, v, wq, gamma)]
        t0 = time.perf_counter()
        o, _ = hybrid_attention_chunked(xs[0], xs[1], xs[2], hedgehog(xs[0], xs[3]), key_map(xs[1]), xs[4],
                                        window=64, memory=memory, key_map=key_map, output_final_state=loop)
        t1 = time.perf_counter()
        o.pow(2).mean().backward()
        t2 = time.perf_counter()
    print(f"| {name} | {t1 - t0:.3f} | {t2 - t1:.3f} |", flush=True)
