"""Diagnostic (CPU): at the answer, does each layer's global cache still hold the pass key's tokens?

Replays each layer's cache selection (`hybrid._selection_schedule`, internal) on a passkey prompt
and prints the fraction of the needle's digit tokens (those older than the window) that the last
selection interval keeps, per layer (best KV head). It separates "the needle was evicted" from "it
is held but not read".

    python3 scripts/needle_in_cache.py DELTA 8192 0.25,0.5 [BUDGET]
"""
import sys

import torch

import lolcats
import lolcats.attention.layer as L
from lolcats.attention import hybrid as hy
from lolcats.eval.needles import build_sample
from lolcats.loading import embedded_default_path

delta, length = sys.argv[1], int(sys.argv[2])
depths = [float(d) for d in sys.argv[3].split(",")]
budget = int(sys.argv[4]) if len(sys.argv) > 4 else None
torch.set_num_threads(2)
base = str(embedded_default_path())
tok = lolcats.load_tokenizer(base)
model = lolcats.from_pretrained(delta, base_model=base, dtype="float32")
if budget:
    lolcats.configure_memory(model, global_cache_size=budget)
orig = L.hybrid_attention
record = []

def spy(q, k, v, fq, fk, gamma, **kw):
    memory, window = kw["memory"], kw["window"]
    if not memory.global_size:
        raise SystemExit("the delta has no global cache: pass a BUDGET")
    Hk = k.shape[2]
    fkg, vg = hy._grouped(fk.float(), Hk), hy._grouped(v.float(), Hk)
    B, T = q.shape[:2]
    valid = torch.ones(B, T, dtype=torch.bool)
    is_sink = hy._sink_flags(valid, memory.sinks)
    n = -(-T // memory.period)
    kept = hy.kept_mask(*hy._selection_schedule(fkg, vg, valid, is_sink, window, memory, n), T)  # [B, Hk, n, T]
    record.append(kept[0, :, -1])  # [Hk, T]: what the last interval's queries read
    return orig(q, k, v, fq, fk, gamma, **kw)

L.hybrid_attention = spy
for depth in depths:
    s = build_sample(tok, "passkey", length, depth, seed=0, index=0)
    ids = s.input_ids
    digits = tok(s.answer, add_special_tokens=False)["input_ids"]  # digit tokens
    pos = [i for i in range(len(ids) - len(digits)) if ids[i:i + len(digits)] == digits]
    needle = sorted({p + j for p in pos for j in range(len(digits))})
    record.clear()
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    T = len(ids)
    outside = [p for p in needle if p < T - 1 - 64 - 63]  # older than the window for the last query
    held = torch.stack([r[:, outside].float().mean(1) for r in record])  # [layers, Hk]
    print(f"L={length} depth={depth} needle tokens {needle[:3]}.. ({len(outside)} beyond the window) "
          f"mean fraction held over layers x heads {held.mean():.2f}; layers with all heads >= 0.8: "
          f"{int((held.min(1).values >= 0.8).sum())}/{len(record)}; per layer (max over heads): "
          + " ".join(f"{x:.1f}" for x in held.max(1).values.tolist()), flush=True)
