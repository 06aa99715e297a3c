"""Position-free memory (`memory_query`): sinks and cached keys scored by rotated queries against the
keys before RoPE. The three forms agree in float64 with every memory, and it is the default math
when the memory queries and keys are the attention's own."""
import pytest
import torch

from lolcats.attention.hybrid import (
    Memory,
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
)
from test_hybrid import make_inputs, valid_rows
from test_memory import MEMORIES, W, recurrent


def inputs(B, T, H, Hk, sharing, seed=0, pad=None):
    """Attention inputs plus separate key-map inputs kf (keys before RoPE) and memory queries mq."""
    q, k, v, fq, _, gamma, key_map, mask = make_inputs(B, T, H, Hk, 6, 5, sharing, seed=seed, pad=pad)
    gen = torch.Generator().manual_seed(seed + 1000)
    kf = torch.randn(B, T, Hk, 6, generator=gen, dtype=torch.float64)
    mq = torch.randn(B, T, H, 6, generator=gen, dtype=torch.float64)
    return q, k, v, fq, key_map(kf), gamma, key_map, mask, kf, mq


def forms(q, k, v, fq, fk, gamma, key_map, mask, kf, mq, memory, softcap=None, log_decay=None):
    """(quadratic, [chunked at C = 3, 5, 16], recurrent) outputs with position-free memory."""
    common = dict(window=W, key_mask=mask, memory=memory, softcap=softcap, log_decay=log_decay, memory_query=mq,
                  key_map_input=kf)
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, **common)
    chunked = [hybrid_attention_chunked(q, k, v, fq, fk, gamma, chunk_size=C, key_map=key_map, **common)[0]
               for C in (3, 5, 16)]
    rec, _ = recurrent(q, k, v, fq, gamma, key_map, mask, W, memory, kf=kf, softcap=softcap, log_decay=log_decay,
                       mq=mq)
    return ref, chunked, rec


@pytest.mark.parametrize("mem", list(MEMORIES))
@pytest.mark.parametrize("T", [1, W - 1, W, W + 1, 9, 37])
@pytest.mark.parametrize("H,Hk", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("sharing", ["query", "kv"])
def test_three_forms_agree(mem, T, H, Hk, sharing):
    ref, chunked, rec = forms(*inputs(2, T, H, Hk, sharing, seed=T * 5 + H), MEMORIES[mem])
    for out in chunked + [rec]:
        assert (out - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("mem", ["sinks", "both"])
@pytest.mark.parametrize("decay", [False, True])
def test_long_left_padded_sequence_with_decay_and_softcap(mem, decay):
    T = 1000
    q, k, v, fq, fk, gamma, key_map, mask, kf, mq = inputs(3, T, 6, 2, "kv", pad=[0, 7, 300])
    log_decay = torch.log(torch.tensor([0.97, 0.9], dtype=torch.float64)) if decay else None
    ref, chunked, rec = forms(q, k, v, fq, fk, gamma, key_map, mask, kf, mq, MEMORIES[mem], softcap=4.0,
                              log_decay=log_decay)
    for out in chunked + [rec]:
        assert (valid_rows(out, mask) - valid_rows(ref, mask)).abs().max() <= 1e-10


@pytest.mark.parametrize("mem", list(MEMORIES))
@pytest.mark.parametrize("split", [1, 13, 20])
def test_prefill_then_continue(mem, split):
    memory = MEMORIES[mem]
    T = 44
    q, k, v, fq, fk, gamma, key_map, mask, kf, mq = inputs(2, T, 6, 3, "query", seed=split, pad=[0, 5])
    common = dict(window=W, memory=memory, key_map=key_map)
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, key_mask=mask, memory=memory,
                                        memory_query=mq, key_map_input=kf)
    a, b = slice(0, split), slice(split, T)
    _, st = hybrid_attention_chunked(q[:, a], k[:, a], v[:, a], fq[:, a], fk[:, a], gamma, key_mask=mask[:, a],
                                     output_final_state=True, key_map_input=kf[:, a], memory_query=mq[:, a], **common)
    rec, _ = recurrent(q[:, b], k[:, b], v[:, b], fq[:, b], gamma, key_map, mask[:, b], W, memory, kf=kf[:, b],
                       state=st, mq=mq[:, b])
    cont, _ = hybrid_attention_chunked(q[:, b], k[:, b], v[:, b], fq[:, b], fk[:, b], gamma, key_mask=mask[:, b],
                                       initial_state=st, chunk_size=7, key_map_input=kf[:, b],
                                       memory_query=mq[:, b], **common)
    for out in (rec, cont):
        assert (valid_rows(out, mask[:, b]) - valid_rows(ref[:, b], mask[:, b])).abs().max() <= 1e-10


@pytest.mark.parametrize("mem", ["sinks", "both"])
def test_own_queries_and_keys_give_the_default_math(mem):
    """memory_query = q and key_map_input = k: the memory is scored exactly as without the option."""
    q, k, v, fq, fk, gamma, key_map, mask = make_inputs(2, 40, 6, 2, 6, 5, "kv", pad=[0, 4])
    base, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, key_mask=mask, memory=MEMORIES[mem],
                                       key_map=key_map)
    same, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, key_mask=mask, memory=MEMORIES[mem],
                                       key_map=key_map, key_map_input=k, memory_query=q)
    assert (valid_rows(same, mask) - valid_rows(base, mask)).abs().max() <= 1e-12


def test_only_the_memory_reads_the_memory_queries():
    """Without keys outside the band the memory queries change nothing; with sinks beyond it they do."""
    q, k, v, fq, fk, gamma, key_map, mask, kf, mq = inputs(1, 20, 4, 2, "kv")
    memory = Memory(sinks=2)

    def run(m):
        return hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, memory=memory, memory_query=m,
                                          key_map_input=kf)[0]
    a, b = run(mq), run(mq * 3.0)
    assert (a[:, :W] - b[:, :W]).abs().max() <= 1e-12  # every sink still inside the band
    assert (a[:, W + 1:] - b[:, W + 1:]).abs().max() > 1e-3


def test_memory_query_needs_the_keys_before_rope():
    q, k, v, fq, fk, gamma, key_map, _, kf, mq = inputs(1, 10, 4, 2, "kv")
    with pytest.raises(ValueError, match="key_map_input"):
        hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, memory=Memory(sinks=2), key_map=key_map,
                                 memory_query=mq)
    with pytest.raises(ValueError, match="shape"):
        hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, memory=Memory(sinks=2), key_map=key_map,
                                 memory_query=mq[:, :5], key_map_input=kf)
