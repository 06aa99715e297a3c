"""THE hybrid attention math of LoLCATs, in three forms that compute the same function.

For query i (positions are tensor indices; left padding keeps them contiguous):

    band     B(i) = { j : lo(i) <= j <= i }          exact softmax (the sliding window)
    extra    X(i) = sinks and global-cache keys outside B(i)   exact softmax too (memory, below)
    linear   L(i) = every other valid key j <= i      Hedgehog linear attention
    s_ij = softcap(scale * q_i . k_j),   m_i = max_{j in B(i)} s_ij  (0 when B(i) is empty)
    y_i  = (sum_B gamma e^{s_ij - m_i} v_j + sum_X gamma e^{min(s_ij - m_i, 60)} v_j + phi_q(q_i)^T S_i)
           / (sum_B gamma e^{s_ij - m_i}   + sum_X gamma e^{min(s_ij - m_i, 60)}   + phi_q(q_i)^T z_i)
    S_i  = sum_{L(i)} lambda^(i-j) phi_k(k_j) v_j^T,   z_i = sum_{L(i)} lambda^(i-j) phi_k(k_j)

Without memory lo(i) = i - w + 1: the last w tokens, the query's own included. w = 0 is pure
(normalised) linear attention; w >= sequence length is plain softmax attention. Padded keys
(key_mask False) take part in no sum. The max m is taken over the band alone, so the linear
part keeps the scale the feature maps were trained for; extra keys with much larger scores (a
sink, a recalled needle) then dominate the shared normaliser as they do in softmax attention
(the clamp at 60 nats only keeps float32 finite).

Decay (optional, `log_decay` = log lambda <= 0, one per state head: [Hk*kg]): the linear part weighs
key j by lambda^(i-j), so the linear mass stays bounded (at most 1 / (1 - lambda) keys) instead of
growing with the context past the length the feature maps were trained at. Without it lambda = 1.
A state (S, z) is held relative to its `position` (S = sum lambda^(position - j) ...), so a query
at t >= position reads lambda^(t - position) S, and each step multiplies S and z by lambda.

Memory beyond the window (`Memory`; fixed size per sequence, so decoding stays constant-memory):

* sinks (s): the first s valid tokens of each row are attended exactly forever, never summed
  into (S, z) (the softmax teacher parks most of its attention on them; StreamingLLM).
* global cache (M, interval P): M exact key/value pairs per KV head chosen online by how badly
  the linear state recalls them (LoLA-style). Selection runs at every position t with t % P == 0:
  the tokens that left the band since the last selection join the cached ones; each candidate
  is scored by its self-recall error mean_g ||v_j - S_g^T phi_g(k_j) / z_g^T phi_g(k_j)||^2 against
  the current state (with a horizon H: log(error) - age_j / H, `selection_score`, so stale keys
  make way unless recalled far worse); the M worst-recalled stay exact, the others are added to (S, z). Between
  selections the band is [floor(i / P) * P - w + 1, i]: w to w + P - 1 tokens, so no token is
  ever lost. Without a global cache P is 1 and this is the plain sliding window.

Position-free memory (optional, `memory_query`): the extra keys X(i) are scored as
softcap(scale * mq_i . kf_j) with mq the queries rotated to one fixed distance and kf the key-map
inputs (the keys before RoPE), instead of q_i . k_j at their true distance. Every sink and cached
key then sits at the same distance from every query, one inside the training length, so the
memory's scores never meet distances the trained hybrid never saw (with true distances they
reach the whole context and the model gets worse the longer it reads). The band keeps RoPE.

Layout (as fla): q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv], fq [B, T, H, F],
fk [B, T, Hk*kg, F] with kg = 1 (one key map per KV head, state shared by the GQA group) or
kg = H / Hk (one key map per query head, the official behaviour). gamma [H] is the window weight.
key_map_input [B, T, Hk, Dk] (default: k) is what key_map featurises: the keys before RoPE when
the feature maps are position-free. Internally heads are grouped as [B, Hk, g, T, .] so GQA never
repeats K/V in memory.

Forms:
  * hybrid_attention_quadratic: the reference; materialises T x T; can return the attention weights.
  * hybrid_attention_chunked:   training and prefill; O(T * (w + C + F * Dv / C)) memory without a
    global cache; with one, the selections are replayed first (no gradient through them) and every
    interval is then one vectorised chunk (training), or, when the state is carried (prefill), an
    exact loop over selection intervals (the linear state is constant inside an interval).
    `_fresh_prefill` vectorises a fresh prompt's prefill but for its last interval, the state
    built from the same selections (the same function and state; slower than the loop on a CPU).
  * hybrid_attention_recurrent: token by token from a HybridState; decoding.
The linear state (S, z) is accumulated in float32 (float64 stays float64) whatever the input dtype.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

KeyMap = Callable[[torch.Tensor], torch.Tensor]  # key_map_input [B, T, Hk, Dk] -> phi_k [B, T, Hk*kg, F]

EXTRA_LOGIT_CLAMP = 60.0  # e^60 already outweighs any band; keeps float32 finite


@dataclass(frozen=True)
class Memory:
    """Exact memory beyond the window, with a fixed budget per sequence (see the module docstring)."""

    sinks: int = 0
    global_size: int = 0
    interval: int = 64
    dedup: float = 1.0  # cosine of values above which the lower-scored of two candidates is not kept
    horizon: int = 0  # tokens: a candidate's selection score falls by e per `horizon` tokens of age; 0 = off

    def __post_init__(self) -> None:
        if (self.sinks < 0 or self.global_size < 0 or self.interval < 1 or not -1.0 <= self.dedup <= 1.0
                or self.horizon < 0):
            raise ValueError("Memory needs sinks >= 0, global_size >= 0, interval >= 1, -1 <= dedup <= 1, "
                             f"horizon >= 0; got {self}")

    @property
    def period(self) -> int:
        """Positions between selections: P with a global cache, 1 (every token) without."""
        return self.interval if self.global_size else 1

    @property
    def active(self) -> bool:
        return bool(self.sinks or self.global_size)


NO_MEMORY = Memory()


GLOBAL_CACHE_FIELDS = ("glob_k", "glob_v", "glob_kf", "glob_valid", "glob_pos")


@dataclass
class HybridState:
    """Decode state of one layer; its size does not depend on the sequence length.

    kv [B, Hk, kg, F, Dv] and k_sum [B, Hk, kg, F]: S and z (float32).
    win_k [B, Hk, Wb, D], win_v [B, Hk, Wb, Dv], win_valid [B, Wb]: the newest Wb = w + P - 1 keys and
    values, oldest first (invalid slots before the sequence is that long, or for padding).
    win_kf [B, Hk, Wb, Dk]: the key-map inputs of those slots when they are not win_k (pre-RoPE keys).
    position: tensor positions seen so far (the same for every row).
    sink_k/sink_v [B, Hk, s, .], sink_pos [B, s] (-1: empty): the attention sinks.
    glob_k/glob_v/glob_kf [B, Hk, M, .], glob_valid [B, Hk, M], glob_pos [B, Hk, M]: the global cache
    (positions: a key folded into a decaying state later is weighed by its age).
    win_head [B] int64, or None: the window buffers are a ring (the in-place decode kernel writes
    the new token over the oldest slot instead of shifting the buffer): slot win_head % Wb is the
    oldest, the others follow it cyclically. None: slot 0 is the oldest. Every form but that kernel
    reads the buffers oldest first, through `ordered()`.
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    win_valid: torch.Tensor
    win_kf: torch.Tensor | None = None
    position: int = 0
    sink_k: torch.Tensor | None = None
    sink_v: torch.Tensor | None = None
    sink_pos: torch.Tensor | None = None
    glob_k: torch.Tensor | None = None
    glob_v: torch.Tensor | None = None
    glob_kf: torch.Tensor | None = None
    glob_valid: torch.Tensor | None = None
    glob_pos: torch.Tensor | None = None
    win_head: torch.Tensor | None = None

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self._tensor_fields())

    def parts(self) -> dict[str, torch.Tensor]:
        """The state's tensors by field name (None fields left out)."""
        return {n: getattr(self, n) for n in self._tensor_fields()}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "HybridState":
        return dataclasses.replace(self, **{n: fn(getattr(self, n)) for n in self._tensor_fields()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def has_memory(self) -> bool:
        return self.sink_k is not None or self.glob_k is not None

    @property
    def global_cache(self) -> tuple:
        """(glob_k, glob_v, glob_kf, glob_valid, glob_pos), as `_select` takes and returns them."""
        return tuple(getattr(self, name) for name in GLOBAL_CACHE_FIELDS)

    def key_inputs(self) -> torch.Tensor:
        return self.win_k if self.win_kf is None else self.win_kf

    def copy_(self, other: "HybridState") -> "HybridState":
        """Write `other` (same shapes) into this state's tensors, in place (fields this state lacks are
        taken as they are); the ring, if any, restarts at slot 0, as `other` is oldest first."""
        other = other.ordered()
        for name, t in other.parts().items():
            dst = getattr(self, name)
            if dst is None:
                setattr(self, name, t)
            else:
                dst.copy_(t)
        if self.win_head is not None:
            self.win_head.zero_()
        self.position = other.position
        return self

    def ordered(self) -> "HybridState":
        """This state with its window buffers oldest first (itself when they are not a ring)."""
        if self.win_head is None:
            return self
        wb = self.win_valid.shape[1]
        idx = (self.win_head.view(-1, 1) + torch.arange(wb, device=self.win_head.device)) % wb  # [B, Wb]

        def roll(t: torch.Tensor) -> torch.Tensor:  # [B, Hk, Wb, .]
            return t.gather(2, idx[:, None, :, None].expand(t.shape))

        return dataclasses.replace(
            self, win_k=roll(self.win_k), win_v=roll(self.win_v), win_valid=self.win_valid.gather(1, idx),
            win_kf=None if self.win_kf is None else roll(self.win_kf), win_head=None,
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def empty_state(
    batch: int, kv_heads: int, key_groups: int, feature_dim: int, head_dim: int, value_dim: int,
    window: int, dtype: torch.dtype, device: torch.device | str | None = None, *,
    memory: Memory | None = None, key_input_dim: int | None = None,
) -> HybridState:
    """A state with nothing seen. key_input_dim: size of separate key-map inputs (None: they are win_k)."""
    memory = memory or NO_MEMORY
    acc = accumulation_dtype(dtype)
    wb = window + memory.period - 1
    z = dict(dtype=dtype, device=device)
    state = HybridState(
        kv=torch.zeros(batch, kv_heads, key_groups, feature_dim, value_dim, dtype=acc, device=device),
        k_sum=torch.zeros(batch, kv_heads, key_groups, feature_dim, dtype=acc, device=device),
        win_k=torch.zeros(batch, kv_heads, wb, head_dim, **z),
        win_v=torch.zeros(batch, kv_heads, wb, value_dim, **z),
        win_valid=torch.zeros(batch, wb, dtype=torch.bool, device=device),
        win_kf=None if key_input_dim is None else torch.zeros(batch, kv_heads, wb, key_input_dim, **z),
    )
    if memory.sinks:
        s = memory.sinks
        state.sink_k = torch.zeros(batch, kv_heads, s, head_dim, **z)
        state.sink_v = torch.zeros(batch, kv_heads, s, value_dim, **z)
        state.sink_pos = torch.full((batch, s), -1, dtype=torch.long, device=device)
    if memory.global_size:
        n = memory.global_size
        state.glob_k = torch.zeros(batch, kv_heads, n, head_dim, **z)
        state.glob_v = torch.zeros(batch, kv_heads, n, value_dim, **z)
        if key_input_dim is not None:
            state.glob_kf = torch.zeros(batch, kv_heads, n, key_input_dim, **z)
        state.glob_valid = torch.zeros(batch, kv_heads, n, dtype=torch.bool, device=device)
        state.glob_pos = torch.zeros(batch, kv_heads, n, dtype=torch.long, device=device)
    return state


# ----------------------------------------------------------------------------------------------
# shared helpers


def _exact_dtypes(form):
    """Run a form with autocast off: it casts to the accumulation dtype itself, and autocast would
    silently run its float32 matmuls (the linear state among them) in bfloat16."""

    @functools.wraps(form)
    def run(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return form(q, *args, **kwargs)

    return run


def check_shapes(q, k, v, fq, fk, gamma, log_decay=None) -> tuple[int, int, int]:
    """Validate the public layout; returns (kv_heads, group size g, key groups kg)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    Hk = k.shape[2]
    if k.shape[:2] != (B, T) or v.shape[:3] != (B, T, Hk) or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hk})")
    g = H // Hk
    if fq.shape[:3] != (B, T, H):
        raise ValueError(f"fq must be [B, T, H, F] = [{B}, {T}, {H}, F], got {tuple(fq.shape)}")
    if fk.shape[:2] != (B, T) or fk.shape[2] not in (Hk, H) or fk.shape[3] != fq.shape[3]:
        raise ValueError(f"fk must be [B, T, {Hk} or {H}, {fq.shape[3]}], got {tuple(fk.shape)}")
    if gamma.shape != (H,):
        raise ValueError(f"gamma must have shape [{H}], got {tuple(gamma.shape)}")
    check_decay(log_decay, fk.shape[2])
    return Hk, g, fk.shape[2] // Hk


def check_decay(log_decay: torch.Tensor | None, state_heads: int) -> None:
    if log_decay is not None and log_decay.shape != (state_heads,):
        raise ValueError(f"log_decay must have shape [{state_heads}] (one per key-map head), got {tuple(log_decay.shape)}")


def check_memory(memory: Memory | None, window: int) -> Memory:
    memory = memory or NO_MEMORY
    if memory.global_size and window < 1:
        raise ValueError("a global cache needs a window of at least 1 token (window_size >= 1)")
    return memory


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, T, Hk*n, X] -> [B, Hk, n, T, X]."""
    B, T, Hn, X = x.shape
    return x.view(B, T, kv_heads, Hn // kv_heads, X).permute(0, 2, 3, 1, 4)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    """[B, Hk, g, T, X] -> [B, T, Hk*g, X]."""
    B, Hk, g, T, X = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(B, T, Hk * g, X)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return s


def _window_terms(s: torch.Tensor, mask: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma * exp(s - m) on the band (0 elsewhere), m) with m the max band score of the row."""
    if s.shape[-1] == 0:  # w = 0: no window at all
        return s, s.new_zeros(*s.shape[:-1], 1)
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with an empty band
    return torch.exp(s - m) * gamma, m


def _extra_terms(s: torch.Tensor, mask: torch.Tensor, m: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """gamma * exp(min(s - m, 60)) on the extra exact keys (sinks, global cache), 0 elsewhere."""
    e = torch.exp(torch.clamp(s - m, max=EXTRA_LOGIT_CLAMP)) * gamma
    return torch.where(mask, e, torch.zeros_like(e))


def check_memory_query(memory_query: torch.Tensor | None, q: torch.Tensor, key_map_input: torch.Tensor | None) -> None:
    """Position-free memory scores the memory keys' key-map inputs: both must come with it."""
    if memory_query is None:
        return
    if key_map_input is None:
        raise ValueError("memory_query scores the memory against the keys before RoPE: pass key_map_input too")
    if memory_query.shape != q.shape:
        raise ValueError(f"memory_query must have q's shape {tuple(q.shape)}, got {tuple(memory_query.shape)}")


def _divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where nothing was attended (padded queries), never NaN."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _gamma_grouped(gamma: torch.Tensor, kv_heads: int, dims_after: int, dtype: torch.dtype) -> torch.Tensor:
    return gamma.to(dtype).view(1, kv_heads, -1, *([1] * dims_after))


def _decay_grouped(log_decay: torch.Tensor, kv_heads: int, dims_after: int, dtype: torch.dtype) -> torch.Tensor:
    """log lambda [Hk*kg] -> [1, Hk, kg, 1, ...] (broadcasts over the query heads of a group when kg = 1)."""
    return log_decay.to(dtype).view(1, kv_heads, -1, *([1] * dims_after))


def _age_weight(log_decay_g: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """lambda^age, ages clamped at 0 (slots that hold nothing may carry any position; they are masked
    afterwards, and e^(positive) there could overflow into inf * 0)."""
    return torch.exp(log_decay_g * age.clamp(min=0).to(log_decay_g.dtype))


def _prefix_over_chunks(x: torch.Tensor, log_decay_c: torch.Tensor | None, span: int) -> torch.Tensor:
    """Exclusive prefix over dim 3 of x [B, Hk, kg, N, ...]: out[n] = sum_{m < n} lambda^(span (n-1-m)) x[m].

    x[m] is chunk m's sum referenced at its end; log_decay_c [Hk, kg] (None: lambda = 1, a plain cumsum).
    """
    if log_decay_c is None:
        return torch.cumsum(x, dim=3) - x
    N = x.shape[3]
    n = torch.arange(N, device=x.device)
    lag = n[:, None] - 1 - n[None, :]  # [N, N]
    mix = torch.exp(log_decay_c.to(x.dtype)[..., None, None] * span * lag.clamp(min=0).to(x.dtype)) * (lag >= 0)
    flat = x.flatten(4) if x.dim() > 4 else x[..., None]
    out = torch.einsum("hknm,bhkmx->bhknx", mix, flat)
    return out.view(x.shape)


def _sink_flags(valid: torch.Tensor, sinks: int, already: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T]: is this token one of the first `sinks` valid tokens of its row (after `already` [B])?"""
    rank = valid.long().cumsum(1) - 1
    if already is not None:
        rank = rank + already[:, None]
    return valid & (rank < sinks)


def recall_error(fk: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor) -> torch.Tensor:
    """How badly the linear state recalls each value from its key: the global cache's selection score.

    fk [B, Hk, kg, n, F], v [B, Hk, 1 or kg, n, Dv], kv [B, Hk, kg, F, Dv], k_sum [B, Hk, kg, F]
    -> mean over kg of ||v - S^T phi / z^T phi||^2, [B, Hk, n] (||v||^2 for an empty state).
    """
    pred = _divide(torch.matmul(fk, kv), torch.matmul(fk, k_sum[..., None]))
    return ((v - pred) ** 2).sum(-1).mean(2)


def selection_score(error: torch.Tensor, age: torch.Tensor, horizon: int) -> torch.Tensor:
    """The global cache's ranking of its candidates: the recall error, discounted by age when `horizon` > 0.

    error [.., n] >= 0, age [.., n] tokens since each candidate's position. With a horizon H the score
    is log(error) - age / H: a key stays cached only while it is recalled e^(age / H) times worse than
    the newer candidates. Without it the cache keeps the worst-recalled keys of the whole history,
    which past the training length are mostly stale ones the model never saw at that age.
    """
    if not horizon:
        return error
    return error.clamp_min(torch.finfo(error.dtype).tiny).log() - age.to(error.dtype) / horizon


def keep_worst_recalled(score: torch.Tensor, candidate: torch.Tensor, budget: int,
                        values: torch.Tensor | None = None, dedup: float = 1.0) -> torch.Tensor:
    """[.., n] bool: the `budget` candidates with the largest score (all of them when fewer).

    With values [.., n, Dv] and dedup < 1, a candidate whose value has cosine > dedup with a
    better-scored candidate's is not kept: a token repeated through the context (whose value the
    state keeps mispredicting however often it sees it) would otherwise fill the whole budget.
    """
    score = score.masked_fill(~candidate, float("-inf"))
    if values is not None and dedup < 1.0:
        unit = F.normalize(values.float(), dim=-1)
        near = torch.matmul(unit, unit.transpose(-1, -2)) > dedup  # [.., n, n]: [j, c]
        idx = torch.arange(score.shape[-1], device=score.device)
        sj, sc = score[..., :, None], score[..., None, :]
        better = (sc > sj) | ((sc == sj) & (idx[None, :] < idx[:, None]))  # c outranks j
        candidate = candidate & ~(near & better & candidate[..., None, :]).any(-1)
        score = score.masked_fill(~candidate, float("-inf"))
    if score.shape[-1] <= budget:
        return candidate
    idx = score.topk(budget, dim=-1).indices
    return torch.zeros_like(candidate).scatter(-1, idx, True) & candidate


def _kept_first(keep: torch.Tensor) -> torch.Tensor:
    """The permutation [.., n] that moves the kept entries first and the rest after, each group in its
    order: a stable partition (a cumsum and a scatter, where a stable argsort would sort)."""
    before = keep.long().cumsum(-1)  # kept entries up to and including each
    pos = torch.arange(keep.shape[-1], device=keep.device).expand_as(before)
    dest = torch.where(keep, before - 1, before[..., -1:] + pos - before)
    return torch.empty_like(dest).scatter_(-1, dest, pos)


def _first_slots(pos: torch.Tensor, ok: torch.Tensor, n: int) -> torch.Tensor:
    """Indices [B, n] of the n valid entries with the smallest positions (valid first), for gathering."""
    key = torch.where(ok, pos, torch.iinfo(pos.dtype).max)
    return key.argsort(dim=1, stable=True)[:, :n]


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, Hk, n, X] at slot indices idx [B, Hk, m] (or [B, m], the same for every head) -> [B, Hk, m, X]."""
    if idx.dim() == 2:
        idx = idx[:, None, :].expand(x.shape[0], x.shape[1], -1)
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def _merge_sinks(old: HybridState | None, k, v, pos, is_sink, sinks: int):
    """The first `sinks` sinks of the state's and the new ones: (sink_k, sink_v, sink_pos).

    k/v [B, Hk, T, .] with positions pos [T] and flags is_sink [B, T].
    """
    B = is_sink.shape[0]
    pos = pos[None, :].expand(B, -1)
    if old is not None and old.sink_k is not None:
        k = torch.cat([old.sink_k.to(k.dtype), k], 2)
        v = torch.cat([old.sink_v.to(v.dtype), v], 2)
        is_sink = torch.cat([old.sink_pos >= 0, is_sink], 1)
        pos = torch.cat([old.sink_pos, pos], 1)
    if k.shape[2] < sinks:  # fewer tokens than slots: pad with empty ones
        extra = sinks - k.shape[2]
        k, v = F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra))
        is_sink = F.pad(is_sink, (0, extra), value=False)
        pos = F.pad(pos, (0, extra), value=-1)
    idx = _first_slots(pos, is_sink, sinks)
    ok = is_sink.gather(1, idx)
    return _take(k, idx), _take(v, idx), torch.where(ok, pos.gather(1, idx), -1)


# ----------------------------------------------------------------------------------------------
# a. quadratic reference


def _selection_schedule(fk_g, v_g, valid, is_sink, window: int, memory: Memory, intervals: int,
                        log_decay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay the global cache's selections over a whole sequence (no gradient flows through them).

    Returns (slots, held), both [B, Hk, intervals, M]: the positions of the keys the queries of each
    selection interval attend exactly from the global cache, in position order, and which of the M
    slots hold one (the rest point at position 0). O(intervals * M) memory, as a cache of M keys
    per interval needs. Each selection scores only its candidates (the cached keys, then the P that
    left the band, in position order as the recurrent form's slots are).
    """
    B, Hk, kg, T, _ = fk_g.shape
    P, M, w = memory.period, memory.global_size, window
    fk_g, v_g = fk_g.detach(), v_g.detach()
    eligible = valid & ~is_sink  # [B, T]
    dev = valid.device
    slots = torch.zeros(B, Hk, intervals, M, dtype=torch.long, device=dev)
    held = torch.zeros(B, Hk, intervals, M, dtype=torch.bool, device=dev)
    idx = torch.zeros(B, Hk, 0, dtype=torch.long, device=dev)
    ok = torch.zeros(B, Hk, 0, dtype=torch.bool, device=dev)
    kv = torch.zeros(B, Hk, kg, fk_g.shape[-1], v_g.shape[-1], dtype=fk_g.dtype, device=dev)
    k_sum = torch.zeros(B, Hk, kg, fk_g.shape[-1], dtype=fk_g.dtype, device=dev)
    dec = None if log_decay is None else _decay_grouped(log_decay.detach(), Hk, 1, fk_g.dtype)  # [1, Hk, kg, 1]
    for c in range(1, intervals):  # a selection at the first position of every interval but the first
        leaving = torch.arange(max(c * P - P - w + 1, 0), max(c * P - w + 1, 0), device=dev)
        idx = torch.cat([idx, leaving.expand(B, Hk, -1)], 2)
        ok = torch.cat([ok, eligible[:, leaving][:, None].expand(B, Hk, -1)], 2)
        f = fk_g.gather(3, idx[:, :, None, :, None].expand(B, Hk, kg, -1, fk_g.shape[-1]))
        vv = _take(v_g[:, :, 0], idx)[:, :, None]  # [B, Hk, 1, n, Dv]
        if dec is not None:  # the state, held relative to the previous selection, now to this one
            kv, k_sum = kv * torch.exp(dec * P)[..., None], k_sum * torch.exp(dec * P)
        age = c * P - idx  # [B, Hk, n]: each candidate's age at this selection
        score = selection_score(recall_error(f, vv, kv, k_sum), age, memory.horizon)
        keep = keep_worst_recalled(score, ok, M, vv[:, :, 0], memory.dedup)
        fold = (ok & ~keep).to(f.dtype)[:, :, None, :, None]
        if dec is not None:  # each folded key weighed by its age at this selection
            fold = fold * _age_weight(dec[..., None], age[:, :, None, :, None])
        kv = kv + torch.matmul((f * fold).transpose(-1, -2), vv)
        k_sum = k_sum + (f * fold).sum(-2)
        order = _kept_first(keep)[:, :, :M]  # kept, in position order
        idx, ok = idx.gather(2, order), keep.gather(2, order)
        n = idx.shape[2]  # (fewer than M while fewer keys have left the band)
        slots[:, :, c, :n], held[:, :, c, :n] = torch.where(ok, idx, 0), ok
    return slots, held


def kept_mask(slots: torch.Tensor, held: torch.Tensor, length: int) -> torch.Tensor:
    """The schedule's slots as masks over the positions: [B, Hk, intervals, length]."""
    mask = torch.zeros(*slots.shape[:-1], length + 1, dtype=torch.bool, device=slots.device)
    return mask.scatter_(-1, torch.where(held, slots, length), True)[..., :length]


def _global_selection(fk_g, v_g, valid, is_sink, window: int, memory: Memory, log_decay=None):
    """The selection schedule as [B, Hk, T_q, T_k] masks (reference form): (cached, summed).

    A key is summed from the selection after it left the band unless that selection keeps it."""
    T = fk_g.shape[3]
    P = memory.period
    kept = kept_mask(*_selection_schedule(fk_g, v_g, valid, is_sink, window, memory, -(-T // P), log_decay), T)
    i = torch.arange(T, device=valid.device)
    cached = kept[:, :, i // P]  # [B, Hk, T_q, T_k]
    left = i[None, :] <= (i // P * P - window)[:, None]  # left the band by the query's selection
    summed = left & (valid & ~is_sink)[:, None, None, :] & ~cached
    return cached, summed


@_exact_dtypes
def hybrid_attention_quadratic(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, return_weights: bool = False, memory: Memory | None = None,
    log_decay: torch.Tensor | None = None, memory_query: torch.Tensor | None = None,
    key_map_input: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference form. Returns (o [B, T, H, Dv], weights [B, H, T, T] or None); O(T^2) memory.

    key_map_input is only read with memory_query (the memory keys it scores); fk is given."""
    Hk, g, kg = check_shapes(q, k, v, fq, fk, gamma, log_decay)
    memory = check_memory(memory, window)
    check_memory_query(memory_query, q, key_map_input)
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    qg, kg_, vg = (_grouped(x.to(acc), Hk) for x in (q, k, v))
    fqg, fkg = _grouped(fq.to(acc), Hk), _grouped(fk.to(acc), Hk)

    i = torch.arange(T, device=q.device)
    P = memory.period
    lo = (i // P) * P - window + 1  # band start per query
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    is_sink = _sink_flags(valid, memory.sinks)
    causal = i[None, :] <= i[:, None]
    in_band = causal & (i[None, :] >= lo[:, None])  # [T_q, T_k]
    older = causal & ~in_band
    vk = valid[:, None, None, :]  # [B, 1, 1, T_k]
    band = in_band & vk
    extra = older & (is_sink[:, None, None, :])  # [B, 1, T_q, T_k]
    if memory.global_size:
        cached, summed = _global_selection(fkg, vg, valid, is_sink, window, memory, log_decay)
        extra = extra | cached
        linear = summed
    else:
        linear = older & vk & ~is_sink[:, None, None, :]
    band, extra, linear = band[:, :, None], extra[:, :, None], linear[:, :, None]  # [B, 1|Hk, 1, T, T]

    s = _scores(qg, kg_, scale, softcap)
    gam = _gamma_grouped(gamma, Hk, 2, acc)
    a_win, m = _window_terms(s, band, gam)
    a_lin = torch.matmul(fqg, fkg.transpose(-1, -2)) * linear
    if log_decay is not None:
        a_lin = a_lin * _age_weight(_decay_grouped(log_decay, Hk, 2, acc), i[:, None] - i[None, :])
    s_x = s if memory_query is None else _scores(
        _grouped(memory_query.to(acc), Hk), _grouped(key_map_input.to(acc), Hk), scale, softcap)
    a = a_win + _extra_terms(s_x, extra, m, gam) + a_lin
    den = a.sum(-1, keepdim=True)
    o = _divide(torch.matmul(a, vg), den)
    weights = _divide(a, den).reshape(B, H, T, T) if return_weights else None
    return _ungrouped(o).to(v.dtype), weights


# ----------------------------------------------------------------------------------------------
# b. chunked form


def prepend_state(q, k, v, fq, fk, key_mask, state: HybridState | None, key_map: KeyMap | None, kf=None):
    """Put the cached window in front of the new tokens (as dummy queries) so one pass continues it.

    Returns (q, k, v, fq, fk, key_mask, kf) with kf the key-map inputs (None: they are k); the
    inputs unchanged when there is no state.
    """
    if state is None:
        return q, k, v, fq, fk, key_mask, kf
    if key_map is None:
        raise ValueError("continuing from a state needs key_map to featurise the cached window keys")
    B, P = state.win_valid.shape
    if P == 0:
        return q, k, v, fq, fk, key_mask, kf
    wk = state.win_k.transpose(1, 2).to(k.dtype)  # [B, P, Hk, D]
    wv = state.win_v.transpose(1, 2).to(v.dtype)
    wkf = state.key_inputs().transpose(1, 2)
    q = torch.cat([q.new_zeros(B, P, *q.shape[2:]), q], 1)
    fq = torch.cat([fq.new_zeros(B, P, *fq.shape[2:]), fq], 1)
    fk = torch.cat([key_map(wkf).to(fk.dtype), fk], 1)
    mask = torch.ones(B, k.shape[1], dtype=torch.bool, device=k.device) if key_mask is None else key_mask.bool()
    if kf is not None or state.win_kf is not None:
        kf = torch.cat([wkf.to(k.dtype), k if kf is None else kf], 1)
    return q, torch.cat([wk, k], 1), torch.cat([wv, v], 1), fq, fk, torch.cat([state.win_valid, mask], 1), kf


def window_buffer(x: torch.Tensor, window: int, value=0) -> torch.Tensor:
    """The last `window` tokens of x [B, T, ...] as [B, ..., window] slots (transposed to [B, Hk, w, X]
    for 4-d inputs), invalid padding slots first when T < window."""
    T = x.shape[1]
    last = x[:, max(T - window, 0):]
    pad = max(window - T, 0)
    if x.dim() == 4:
        return F.pad(last.transpose(1, 2), (0, 0, pad, 0))
    return F.pad(last, (pad, 0), value=value)


def _final_state(k, v, fk, valid, window: int, Hk: int, initial: HybridState | None, *, kf=None,
                 summable=None, sinks=None, position: int = 0, log_decay=None, new_tokens: int = 0) -> HybridState:
    """S, z over keys older than the last w (sinks excluded), the last w keys as the window buffer.

    With decay, S and z are held relative to the end (key at index j: lambda^(T - j)); the initial
    state, relative to where the `new_tokens` began, ages by lambda^new_tokens."""
    B, T = valid.shape
    acc = accumulation_dtype(k.dtype)
    n_old = max(T - window, 0)
    ok = valid if summable is None else summable
    fk_old = _grouped(fk[:, :n_old].to(acc), Hk) * ok[:, None, None, :n_old, None]
    if log_decay is not None:
        dec = _decay_grouped(log_decay, Hk, 2, acc)  # [1, Hk, kg, 1, 1]
        ages = (T - torch.arange(n_old, device=k.device))[:, None]  # [n_old, 1]
        fk_old = fk_old * _age_weight(dec, ages)  # [1, Hk, kg, n_old, 1]
    v_old = _grouped(v[:, :n_old].to(acc), Hk)
    kv = torch.matmul(fk_old.transpose(-1, -2), v_old)  # [B, Hk, kg, F, Dv]
    k_sum = fk_old.sum(-2)
    if initial is not None:
        if log_decay is None:
            kv, k_sum = kv + initial.kv, k_sum + initial.k_sum
        else:
            age = torch.exp(dec * new_tokens)  # [1, Hk, kg, 1, 1]
            kv, k_sum = kv + initial.kv * age, k_sum + initial.k_sum * age[..., 0]
    state = HybridState(kv, k_sum, window_buffer(k, window), window_buffer(v, window),
                        window_buffer(valid, window, value=False),
                        win_kf=None if kf is None else window_buffer(kf, window), position=position)
    if sinks is not None:
        state.sink_k, state.sink_v, state.sink_pos = sinks
    return state


@_exact_dtypes
def hybrid_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, chunk_size: int = 64,
    initial_state: HybridState | None = None, output_final_state: bool = False, key_map: KeyMap | None = None,
    memory: Memory | None = None, key_map_input: torch.Tensor | None = None, log_decay: torch.Tensor | None = None,
    memory_query: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState | None]:
    """Chunked form: never builds a T x T tensor. Returns (o [B, T, H, Dv], final state or None).

    Window part: each chunk of C queries scores only its C + w candidate keys (a band mask).
    Linear part: keys shifted right by w make it an ordinary inclusive causal linear attention,
    done chunk-wise (intra-chunk C x C + inter-chunk prefix states). Sinks are a few extra keys
    per row. A global cache runs every selection interval at once on a fresh sequence whose state
    is not asked for (`_global_cache_intervals`: training), else `_memory_segments` (one interval at
    a time, the state carried: prefill). `_fresh_prefill` is the vectorised alternative for a fresh
    prompt's prefill (the GPU's opt-in, `ops.hybrid.memory_forms.prefill_form`).
    """
    Hk, g, kg = check_shapes(q, k, v, fq, fk, gamma, log_decay)
    memory = check_memory(memory, window)
    check_memory_query(memory_query, q, key_map_input)
    initial_state = None if initial_state is None else initial_state.ordered()
    if memory.global_size and key_map is None:  # also where the interval pass would not need it
        raise ValueError("a global cache needs key_map to score and fold the keys it selects")
    if memory.global_size and initial_state is None and not output_final_state:
        return _global_cache_intervals(q, k, v, fq, fk, gamma, window=window, memory=memory, scale=scale,
                                       softcap=softcap, key_mask=key_mask, log_decay=log_decay,
                                       memory_query=memory_query, key_map_input=key_map_input), None
    if memory.global_size:
        o, state = _memory_segments(
            q, k, v, fq, gamma, state=initial_state, key_map=key_map, window=window, memory=memory, scale=scale,
            softcap=softcap, key_mask=key_mask, key_map_input=key_map_input, feature_dim=fk.shape[-1],
            key_groups=kg, segment=memory.period, log_decay=log_decay, memory_query=memory_query,
        )
        return o, state if output_final_state else None
    T_new = q.shape[1]
    position = 0 if initial_state is None else initial_state.position
    q, k, v, fq, fk, key_mask, kf = prepend_state(q, k, v, fq, fk, key_mask, initial_state, key_map, key_map_input)
    B, T, H, D = q.shape
    mq, mk = q, k  # what scores the sinks (position-free memory: rotated queries, keys before RoPE)
    if memory_query is not None:
        mq, mk = torch.cat([memory_query.new_zeros(B, T - T_new, H, D), memory_query], 1), kf
    start = position + T_new - T  # tensor position of the first (possibly prepended) token
    scale = D**-0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    pos = start + torch.arange(T, device=q.device)
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    pad = N * C - T
    w = window

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, Hk, n, T, X] -> [B, Hk, n, N, C, X]
        x = F.pad(x, (0, 0, 0, pad))
        return x.view(*x.shape[:3], N, C, x.shape[-1])

    qg, kk, vg = (_grouped(x.to(acc), Hk) for x in (q, k, v))  # kk, vg: [B, Hk, 1, T, .]
    fqg = chunks(_grouped(fq.to(acc), Hk))  # [B, Hk, g, N, C, F]
    Dv = v.shape[-1]
    gam = _gamma_grouped(gamma, Hk, 3, acc)

    sinks = None
    summable = valid
    if memory.sinks:  # the first s valid tokens: never summed, attended exactly once out of the window
        s_n = memory.sinks
        if initial_state is None:
            new_sink = is_sink = _sink_flags(valid, s_n)
        else:
            if initial_state.sink_pos is None:
                raise ValueError("memory has attention sinks but the initial state has no sink slots")
            n_pre = T - T_new  # prepended window tokens: sinks iff the state holds them
            fresh = valid.clone()
            fresh[:, :n_pre] = False
            new_sink = _sink_flags(fresh, s_n, (initial_state.sink_pos >= 0).sum(1))
            held = (pos[None, :, None] == initial_state.sink_pos[:, None, :]).any(-1)
            held[:, n_pre:] = False
            is_sink = new_sink | held
        summable = valid & ~is_sink
        sinks = _merge_sinks(initial_state, mk.transpose(1, 2), v.transpose(1, 2), pos, new_sink, s_n)

    num = torch.zeros(B, Hk, g, N, C, Dv, dtype=acc, device=q.device)
    den = torch.zeros(B, Hk, g, N, C, 1, dtype=acc, device=q.device)
    m = torch.zeros(B, Hk, g, N, C, 1, dtype=acc, device=q.device)

    # window part: chunk n sees keys [nC - w, nC + C); local query a, local key b: a < b <= a + w
    if w > 0:
        kpad = F.pad(kk, (0, 0, w, pad))  # [B, Hk, 1, w + N*C, D]
        vpad = F.pad(vg, (0, 0, w, pad))
        mpad = F.pad(valid, (w, pad), value=False)
        kblk = kpad.unfold(3, C + w, C).transpose(-1, -2)  # [B, Hk, 1, N, C + w, D]
        vblk = vpad.unfold(3, C + w, C).transpose(-1, -2)
        mblk = mpad.unfold(1, C + w, C)  # [B, N, C + w]
        a_idx = torch.arange(C, device=q.device)[:, None]
        b_idx = torch.arange(C + w, device=q.device)[None, :]
        band = (b_idx > a_idx) & (b_idx <= a_idx + w)  # [C, C + w]
        mask = band & mblk[:, None, None, :, None, :]  # [B, 1, 1, N, C, C + w]
        a_win, m = _window_terms(_scores(chunks(qg), kblk, scale, softcap), mask, gam)
        num = num + torch.matmul(a_win, vblk)
        den = den + a_win.sum(-1, keepdim=True)

    # sinks: extra exact keys for the queries whose window no longer holds them
    if sinks is not None:
        sink_k, sink_v, sink_pos = sinks  # [B, Hk, s, .], [B, s]
        mqg = qg if memory_query is None else _grouped(mq.to(acc), Hk)
        s_x = _scores(chunks(mqg), sink_k.to(acc)[:, :, None, None], scale, softcap)  # [B, Hk, g, N, C, s]
        qpos = F.pad(pos, (0, pad), value=-1).view(N, C)
        outside = (sink_pos[:, None, None, :] >= 0) & (sink_pos[:, None, None, :] < (qpos - w + 1)[None, :, :, None])
        a_x = _extra_terms(s_x, outside[:, None, None], m, gam)  # [B, N, C, s] -> [B, 1, 1, N, C, s]
        num = num + torch.matmul(a_x, sink_v.to(acc)[:, :, None, None])
        den = den + a_x.sum(-1, keepdim=True)

    # linear part: shifted keys ks_i = phi_k(k_{i-w}); query i reads all ks_{i'} with i' <= i
    fk_valid = _grouped(fk.to(acc), Hk) * summable.to(acc)[:, None, None, :, None]  # [B, Hk, kg, T, F]
    fks = F.pad(fk_valid, (0, 0, w, 0))[..., :T, :]
    vs = F.pad(vg, (0, 0, w, 0))[..., :T, :]
    fks, vs = chunks(fks), chunks(vs)  # [B, Hk, kg, N, C, F], [B, Hk, 1, N, C, Dv]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    a_lin = torch.matmul(fqg, fks.transpose(-1, -2)) * causal  # [B, Hk, g, N, C, C]
    dec = read = None
    if log_decay is not None:  # shifted key r (original index r - w) read by query c: lambda^(w + c - r)
        dec = _decay_grouped(log_decay, Hk, 3, acc)  # [1, Hk, kg, 1, 1, 1]
        c_idx = torch.arange(C, device=q.device)
        a_lin = a_lin * _age_weight(dec, w + c_idx[:, None] - c_idx[None, :])
        fks_end = fks * _age_weight(dec, C - c_idx[:, None])  # chunk sums held relative to the chunk's end
        read = _age_weight(dec, w + c_idx[:, None])  # [1, Hk, kg, 1, C, 1]: a chunk start's state, read at c
    num = num + torch.matmul(a_lin, vs)
    den = den + a_lin.sum(-1, keepdim=True)
    fks_sum = fks if dec is None else fks_end
    kv_chunk = torch.matmul(fks_sum.transpose(-1, -2), vs)  # [B, Hk, kg, N, F, Dv]
    log_c = None if dec is None else log_decay.to(acc).view(Hk, -1)
    kv_prefix = _prefix_over_chunks(kv_chunk, log_c, C)  # exclusive prefix over chunks
    z_prefix = _prefix_over_chunks(fks_sum.sum(-2), log_c, C)  # [B, Hk, kg, N, F]
    if initial_state is not None and dec is None:
        kv_prefix = kv_prefix + initial_state.kv.to(acc)[:, :, :, None]
        z_prefix = z_prefix + initial_state.k_sum.to(acc)[:, :, :, None]
    lin_num, lin_den = torch.matmul(fqg, kv_prefix), torch.matmul(fqg, z_prefix[..., None])
    if read is not None:
        lin_num, lin_den = lin_num * read, lin_den * read
    if initial_state is not None and dec is not None:  # held relative to the first new token's position
        t_idx = torch.arange(N * C, device=q.device).view(N, C, 1) - (T - T_new)
        age = _age_weight(dec, t_idx)  # [1, Hk, kg, N, C, 1]
        lin_num = lin_num + torch.matmul(fqg, initial_state.kv.to(acc)[:, :, :, None]) * age
        lin_den = lin_den + torch.matmul(fqg, initial_state.k_sum.to(acc)[:, :, :, None, :, None]) * age
    num, den = num + lin_num, den + lin_den

    o = _divide(num, den).reshape(B, Hk, g, N * C, Dv)[..., :T, :]
    o = _ungrouped(o)[:, T - T_new:].to(v.dtype)
    state = None
    if output_final_state:
        state = _final_state(k, v, fk, valid, w, Hk, initial_state, kf=kf, summable=summable, sinks=sinks,
                             position=position + T_new, log_decay=log_decay, new_tokens=T_new)
    return o, state


def interval_exact_terms(qc, mqc, kb, vb, kvalid, xk, xv, xmask, *, window: int, scale: float,
                         softcap: float | None):
    """The exact terms of each selection interval, gamma left out: (num, den) of the band and the
    extra keys (sinks, cached keys) with the band's max m, as `_global_cache_intervals` sums them.

    qc, mqc [B, Hk, g, N, P, D]: each interval's queries (mqc scores the extras: the memory queries,
    or qc); kb/vb [B, Hk, N, KB, .] with KB = P + w - 1: interval n's band keys [nP - w + 1, nP + P)
    (local query a sees local keys b <= a + w - 1), kvalid [B, N, KB]; xk/xv [B, Hk, N, X, .] the
    extra keys of each interval, xmask [B, Hk, N, X]. Returns num [B, Hk, g, N, P, Dv] and den
    [.., 1] in the accumulation dtype. `ops.hybrid.interval` has the same function as kernels.
    """
    acc = accumulation_dtype(qc.dtype)
    P, KB = qc.shape[-2], kb.shape[-2]
    a_idx = torch.arange(P, device=qc.device)[:, None]
    b_idx = torch.arange(KB, device=qc.device)[None, :]
    band = (b_idx <= a_idx + window - 1) & kvalid[:, None, None, :, None, :]  # [B, 1, 1, N, P, KB]
    e, m = _window_terms(_scores(qc.to(acc), kb.to(acc)[:, :, None], scale, softcap), band, 1.0)
    num = torch.matmul(e, vb.to(acc)[:, :, None])
    den = e.sum(-1, keepdim=True)
    e = _extra_terms(_scores(mqc.to(acc), xk.to(acc)[:, :, None], scale, softcap), xmask[:, :, None, :, None, :],
                     m, 1.0)
    return num + torch.matmul(e, xv.to(acc)[:, :, None]), den + e.sum(-1, keepdim=True)


def _global_cache_intervals(q, k, v, fq, fk, gamma, *, window: int, memory: Memory, scale, softcap, key_mask,
                            log_decay=None, memory_query=None, key_map_input=None, schedule=None, exact=None):
    """A fresh sequence with a global cache, every interval at once (training, plain forwards).

    The selections are replayed first (`_selection_schedule`, no gradient); then each interval of P
    queries is one chunk: its band [cP - w + 1, i] (P + w - 1 candidate keys), the sinks and the
    cached keys it attends exactly, and the linear state of the keys folded by its selection. No
    T x T tensor; the state is not returned (prefill runs the interval loop). schedule: what replays
    the selections (`_selection_schedule`'s signature; the GPU path replays it as a CUDA graph);
    exact: what sums the exact terms (`interval_exact_terms`'s signature; the GPU path's kernels).
    """
    B, T, H, D = q.shape
    Hk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    P, M, w = memory.period, memory.global_size, window
    N = -(-T // P)
    pad = N * P - T
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    is_sink = _sink_flags(valid, memory.sinks)

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, Hk, n, T, X] -> [B, Hk, n, N, P, X]
        x = F.pad(x, (0, 0, 0, pad))
        return x.view(*x.shape[:3], N, P, x.shape[-1])

    qx, kx, vx = (_grouped(x, Hk) for x in (q, k, v))  # the exact terms' inputs, in their own dtype
    vg = vx.to(acc)  # [B, Hk, 1, T, Dv]
    fkg = _grouped(fk.to(acc), Hk)  # [B, Hk, kg, T, F]
    fqc = chunks(_grouped(fq.to(acc), Hk))  # [B, Hk, g, N, P, F]
    gam = _gamma_grouped(gamma, Hk, 3, acc)
    slot, ok = (schedule or _selection_schedule)(fkg, vg, valid, is_sink, w, memory, N, log_decay)  # [B, Hk, N, M]

    # band: interval n sees keys [nP - w + 1, nP + P); local query a, local key b: b <= a + w - 1
    kblk, vblk = (F.pad(x[:, :, 0], (0, 0, w - 1, pad)).unfold(2, P + w - 1, P).transpose(-1, -2)
                  for x in (kx, vx))  # [B, Hk, N, P + w - 1, .]
    kvalid = F.pad(valid, (w - 1, pad), value=False).unfold(1, P + w - 1, P)  # [B, N, P + w - 1]

    # exact keys outside the band: the sinks (those the interval's band does not hold), and each
    # interval's cached keys
    mqx, mk = qx, kx  # position-free memory scores them with other queries and keys
    if memory_query is not None:
        mqx, mk = _grouped(memory_query, Hk), _grouped(key_map_input, Hk)
    xk, xv = (_take(x[:, :, 0], slot.flatten(2)).view(B, Hk, N, -1, x.shape[-1]) for x in (mk, vx))
    cv, xmask = xv.to(acc), ok  # (cv: the cached values, for the linear part)
    if memory.sinks:
        idx = _first_slots(torch.arange(T, device=q.device).expand(B, T), is_sink, memory.sinks)  # [B, s]
        lo = torch.arange(N, device=q.device) * P - w + 1  # band start per interval
        outside = is_sink.gather(1, idx)[:, None, :] & (idx[:, None, :] < lo[None, :, None])  # [B, N, s]
        sk, sv = (_take(x[:, :, 0], idx)[:, :, None].expand(-1, -1, N, -1, -1) for x in (mk, vx))
        xk, xv = torch.cat([sk, xk], 3), torch.cat([sv, xv], 3)
        xmask = torch.cat([outside[:, None].expand(-1, Hk, -1, -1), ok], 3)
    num, den = (exact or interval_exact_terms)(chunks(qx), chunks(mqx), kblk, vblk, kvalid, xk, xv, xmask,
                                               window=w, scale=scale, softcap=softcap)
    num, den = num * gam, den * gam

    # linear part: interval n reads every eligible key that left the band by its selection
    # (t <= nP - w: keys shifted right by w - 1, an exclusive prefix over intervals) but the ones
    # it holds in the cache (at most M: subtracted), so no [N, T, F] tensor is built
    # (with decay: interval n's state held relative to nP; its query a reads it times lambda^a)
    eligible = (valid & ~is_sink).to(acc)[:, None, None, :, None]
    fks = chunks(F.pad(fkg * eligible, (0, 0, w - 1, 0))[..., :T, :])  # [B, Hk, kg, N, P, F]
    vs = chunks(F.pad(vg, (0, 0, w - 1, 0))[..., :T, :])
    dec = None if log_decay is None else _decay_grouped(log_decay, Hk, 3, acc)  # [1, Hk, kg, 1, 1, 1]
    p_idx = torch.arange(P, device=q.device)
    if dec is not None:  # shifted slot r holds key nP + r - w + 1: its age at the interval's end
        fks = fks * _age_weight(dec, P + w - 1 - p_idx[:, None])
    kv_chunk, z_chunk = torch.matmul(fks.transpose(-1, -2), vs), fks.sum(-2)
    log_c = None if dec is None else log_decay.to(acc).view(Hk, -1)
    kv = _prefix_over_chunks(kv_chunk, log_c, P)  # [B, Hk, kg, N, F, Dv]
    z = _prefix_over_chunks(z_chunk, log_c, P)  # [B, Hk, kg, N, F]
    kept_f = _take(fkg.flatten(1, 2), slot.flatten(2).repeat_interleave(fkg.shape[2], 1))
    kept_f = kept_f.view(B, Hk, -1, N, slot.shape[-1], fkg.shape[-1]) * ok[:, :, None, :, :, None].to(acc)
    if dec is not None:  # a cached key's age at its interval's start
        starts = (torch.arange(N, device=q.device) * P)[None, None, None, :, None]
        kept_f = kept_f * _age_weight(dec[..., 0], starts - slot[:, :, None])[..., None]
    kv = kv - torch.matmul(kept_f.transpose(-1, -2), cv[:, :, None])
    z = z - kept_f.sum(-2)
    lin_num, lin_den = torch.matmul(fqc, kv), torch.matmul(fqc, z[..., None])
    if dec is not None:
        read = _age_weight(dec, p_idx[:, None])  # [1, Hk, kg, 1, P, 1]
        lin_num, lin_den = lin_num * read, lin_den * read
    num, den = num + lin_num, den + lin_den
    o = _divide(num, den).reshape(B, Hk, H // Hk, N * P, -1)[..., :T, :]
    return _ungrouped(o).to(v.dtype)


def _state_at_interval_start(k, v, fk, valid, is_sink, slot, ok, *, window: int, memory: Memory, position: int,
                             kf=None, sink_keys=None, log_decay=None) -> HybridState:
    """The recurrent form's state at `position` (an interval start, before its selection) after a
    fresh sequence k, v [B, T = position, Hk, .], from the selection schedule's last row (slot, ok
    [B, Hk, M]: the keys cached since the previous selection): the keys that selection folded in (S,
    z) (each weighed by its age now, with decay), the cache in position order, the window buffer of
    the last w + P - 1 slots, the sinks (of sink_keys: the keys or their key-map inputs)."""
    B, T, Hk, _ = k.shape
    kept_last = kept_mask(slot, ok, T)  # [B, Hk, T]
    P, w = memory.period, window
    acc = accumulation_dtype(k.dtype)
    fkg = _grouped(fk.to(acc), Hk)  # [B, Hk, kg, T, F]
    t = torch.arange(T, device=k.device)
    folded = (t <= position - P - w) & (valid & ~is_sink)[:, None, :] & ~kept_last  # [B, Hk, T]
    weight = folded.to(acc)[:, :, None, :, None]
    if log_decay is not None:
        weight = weight * _age_weight(_decay_grouped(log_decay, Hk, 2, acc), (position - t)[:, None])
    fw = fkg * weight
    kv = torch.matmul(fw.transpose(-1, -2), _grouped(v.to(acc), Hk))  # [B, Hk, kg, F, Dv]
    k_sum = fw.sum(-2)
    wb = w + P - 1
    slot_pos = position - wb + torch.arange(wb, device=k.device)
    src = slot_pos.clamp_min(0)
    inside = slot_pos >= 0

    def window_slots(x):  # [B, T, Hk, X] -> [B, Hk, wb, X]: zeros before the sequence
        return (x[:, src] * inside[None, :, None, None].to(x.dtype)).transpose(1, 2)

    state = HybridState(kv, k_sum, window_slots(k), window_slots(v), valid[:, src] & inside[None, :],
                        win_kf=None if kf is None else window_slots(kf), position=position)
    if memory.sinks:
        state.sink_k, state.sink_v, state.sink_pos = _merge_sinks(None, sink_keys.transpose(1, 2), v.transpose(1, 2),
                                                                  t, is_sink, memory.sinks)
    glob = [_take(x.transpose(1, 2), slot) * ok[..., None].to(x.dtype) for x in (k, v, kf) if x is not None]
    state.glob_k, state.glob_v = glob[0], glob[1]
    state.glob_kf = glob[2] if kf is not None else None
    state.glob_valid, state.glob_pos = ok, slot  # (the schedule's empty slots point at position 0)
    return state


def _fresh_prefill(q, k, v, fq, fk, gamma, *, window: int, memory: Memory, scale, softcap, key_mask, key_map,
                   log_decay=None, memory_query=None, key_map_input=None, exact=None, schedule=_selection_schedule):
    """A fresh sequence with a global cache and its final state: every interval but the last at
    once (`_global_cache_intervals`), the state at the last interval's start from the same
    selection schedule, then the interval loop for the last interval alone (as `_memory_segments`).
    Same function and state as the loop over every interval. Fewer, larger ops than the loop: for a
    GPU, where the loop's small ops cost launches; on a CPU the loop is faster
    (scripts/prefill_memory_forms.py). Needs T > P (at least one interval before the last).
    ``schedule``: what replays the selections (`_selection_schedule`'s signature; the GPU's is graphed)."""
    B, T, H, D = q.shape
    Hk, P = k.shape[2], memory.period
    cut = (T - 1) // P * P  # the last interval's start
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    is_sink = _sink_flags(valid, memory.sinks)
    acc = accumulation_dtype(q.dtype)
    head = slice(0, cut)
    slot, ok = schedule(_grouped(fk[:, head].to(acc), Hk), _grouped(v[:, head].to(acc), Hk),
                        valid[:, head], is_sink[:, head], window, memory, cut // P, log_decay)
    o = _global_cache_intervals(
        q[:, head], k[:, head], v[:, head], fq[:, head], fk[:, head], gamma, window=window, memory=memory, scale=scale,
        softcap=softcap, key_mask=valid[:, head], log_decay=log_decay, schedule=lambda *args: (slot, ok), exact=exact,
        memory_query=None if memory_query is None else memory_query[:, head],
        key_map_input=None if key_map_input is None else key_map_input[:, head])
    kf = None if key_map_input is None else key_map_input[:, head]
    state = _state_at_interval_start(
        k[:, head], v[:, head], fk[:, head], valid[:, head], is_sink[:, head], slot[:, :, -1], ok[:, :, -1],
        window=window, memory=memory, position=cut, kf=kf, sink_keys=k[:, head] if memory_query is None else kf,
        log_decay=log_decay)
    tail = slice(cut, T)
    o_tail, state = _memory_segments(
        q[:, tail], k[:, tail], v[:, tail], fq[:, tail], gamma, state=state, key_map=key_map, window=window,
        memory=memory, scale=scale, softcap=softcap, key_mask=valid[:, tail],
        key_map_input=None if key_map_input is None else key_map_input[:, tail], feature_dim=fk.shape[-1],
        key_groups=fk.shape[2] // Hk, segment=P, log_decay=log_decay,
        memory_query=None if memory_query is None else memory_query[:, tail])
    return torch.cat([o, o_tail], 1), state


# ----------------------------------------------------------------------------------------------
# c. recurrent form (and the interval loop the chunked form runs with a global cache)


def _select(kv, k_sum, ck, cv, ckf, leaving, pos, glob, key_map: KeyMap, memory: Memory, p0: int | torch.Tensor,
            dec=None):
    """The selection at an interval start p0 (p0 % P == 0): the P slots that leave the band (ck, cv,
    ckf [B, Hk, P, .], positions pos [P], leaving [B, P]: valid and no sink) and the global cache
    `glob` (glob_k, glob_v, glob_kf, glob_valid, glob_pos; Nones without one) are the candidates;
    the M worst recalled by (kv, k_sum) stay cached, the others are folded into (kv, k_sum), each
    weighed by its age at p0 (dec: log lambda as [1, Hk, kg, 1, 1], None without decay).
    Returns (kv, k_sum, glob). Also what the decode kernels run (in PyTorch) at interval starts, with
    p0 (and pos) as device tensors where a CUDA graph replays it.
    """
    B, Hk, P = ck.shape[:3]
    acc = kv.dtype
    cand = leaving[:, None, :].expand(B, Hk, P)
    cpos = pos.expand(B, Hk, P)
    if memory.global_size:
        gk, gv, gkf, gok, gpos = glob
        ck, cv = torch.cat([gk, ck], 2), torch.cat([gv, cv], 2)
        ckf = torch.cat([gk if gkf is None else gkf, ckf], 2)
        cand = torch.cat([gok, cand], 2)  # [B, Hk, M + P]
        cpos = torch.cat([gpos, cpos], 2)
    age = p0 - cpos  # [B, Hk, M + P]: each candidate's age now (the selection's and the fold's)
    f = key_map(ckf.transpose(1, 2))  # slots as tokens [B, M + P, Hk, Dk] -> [B, M + P, Hk*kg, F]
    fg = _grouped(f.to(acc), Hk)  # [B, Hk, kg, M + P, F]
    vg = cv.to(acc)[:, :, None]  # [B, Hk, 1, M + P, Dv]
    if memory.global_size:
        with torch.no_grad():
            score = selection_score(recall_error(fg, vg, kv, k_sum), age, memory.horizon)
        keep = keep_worst_recalled(score, cand, memory.global_size, cv, memory.dedup)
        idx = _kept_first(keep)[:, :, : memory.global_size]  # kept first
        glob = (_take(ck, idx), _take(cv, idx), None if gkf is None else _take(ckf, idx), keep.gather(2, idx),
                cpos.gather(2, idx))
        fold = cand & ~keep
    else:
        fold = cand
    fg = fg * fold[:, :, None, :, None].to(acc)
    if dec is not None:  # a folded key weighed by its age now
        fg = fg * _age_weight(dec, age[:, :, None, :, None])
    kv = kv + torch.matmul(fg.transpose(-1, -2), vg)
    k_sum = k_sum + fg.sum(-2)
    return kv, k_sum, glob


def _memory_segment(state: HybridState, q, k, v, fq, kf, valid_new, gamma, key_map: KeyMap, *,
                    window: int, memory: Memory, scale: float, softcap: float | None, log_decay=None, mq=None):
    """Advance `state` by n tokens that lie in one selection interval (the first may open it).

    q [B, n, H, D], k/v [B, n, Hk, .], fq [B, n, H, F], kf [B, n, Hk, Dk] or None, valid_new [B, n];
    mq [B, n, H, D] or None: position-free memory (sinks hold key-map inputs, the cache scores glob_kf).
    Order: append the tokens, select (at an interval start), attend, drop the slots no band needs.
    """
    B, n, H, D = q.shape
    Hk = k.shape[2]
    acc = state.kv.dtype
    P, w = memory.period, window
    p0 = state.position
    wb = state.win_valid.shape[1]  # w + P - 1
    # 1. append: slots hold positions p0 - wb .. p0 + n - 1
    buf_k = torch.cat([state.win_k, k.transpose(1, 2).to(state.win_k.dtype)], 2)  # [B, Hk, wb + n, D]
    buf_v = torch.cat([state.win_v, v.transpose(1, 2).to(state.win_v.dtype)], 2)
    buf_ok = torch.cat([state.win_valid, valid_new], 1)  # [B, wb + n]
    buf_kf = None
    if state.win_kf is not None:
        buf_kf = torch.cat([state.win_kf, kf.transpose(1, 2).to(state.win_kf.dtype)], 2)
    slot_pos = p0 - wb + torch.arange(wb + n, device=q.device)
    new_pos = slot_pos[wb:]
    sink_k = sink_v = sink_pos = None
    if memory.sinks:
        filled = (state.sink_pos >= 0).sum(1)
        new_sink = _sink_flags(valid_new, memory.sinks, filled)
        sink_k, sink_v, sink_pos = _merge_sinks(
            state, (buf_k if mq is None else buf_kf)[:, :, wb:], buf_v[:, :, wb:], new_pos, new_sink, memory.sinks)
        slot_sink = (slot_pos[None, :, None] == sink_pos[:, None, :]).any(-1)  # [B, wb + n]
    else:
        slot_sink = torch.zeros_like(buf_ok)
    kv, k_sum = state.kv, state.k_sum  # held relative to p0 (with decay)
    dec = None if log_decay is None else _decay_grouped(log_decay, Hk, 2, acc)  # [1, Hk, kg, 1, 1]
    glob = state.global_cache

    # 2. selection: the P oldest slots left the band (positions p0 - w - P + 1 .. p0 - w)
    if p0 % P == 0:
        kv, k_sum, glob = _select(
            kv, k_sum, buf_k[:, :, :P], buf_v[:, :, :P], (buf_kf if buf_kf is not None else buf_k)[:, :, :P],
            (buf_ok & ~slot_sink)[:, :P], slot_pos[:P], glob, key_map, memory, p0, dec)

    # 3. attend: band [floor(t / P) * P - w + 1, t], extras outside it, the linear state
    lo = (p0 // P) * P - w + 1
    qg = _grouped(q.to(acc), Hk)  # [B, Hk, g, n, D]
    band = (slot_pos[None, :] >= lo) & (slot_pos[None, :] <= new_pos[:, None])  # [n, wb + n]
    band = band[None, None, None] & buf_ok[:, None, None, None, :]
    gam = _gamma_grouped(gamma, Hk, 2, acc)
    a_win, m = _window_terms(_scores(qg, buf_k.to(acc)[:, :, None], scale, softcap), band, gam)
    num = torch.matmul(a_win, buf_v.to(acc)[:, :, None])
    den = a_win.sum(-1, keepdim=True)
    extras = []
    if sink_k is not None:
        extras.append((sink_k, sink_v, ((sink_pos >= 0) & (sink_pos < lo))[:, None, None, None, :]))
    if memory.global_size:
        extras.append((glob[0] if mq is None else glob[2], glob[1], glob[3][:, :, None, None, :]))
    mqg = qg if mq is None else _grouped(mq.to(acc), Hk)
    for xk, xv, xmask in extras:
        a_x = _extra_terms(_scores(mqg, xk.to(acc)[:, :, None], scale, softcap), xmask, m, gam)
        num = num + torch.matmul(a_x, xv.to(acc)[:, :, None])
        den = den + a_x.sum(-1, keepdim=True)
    fqg = _grouped(fq.to(acc), Hk)  # [B, Hk, g, n, F]
    lin_num = torch.matmul(fqg, kv)  # kv [B, Hk, 1 or g, F, Dv]: shared by the group or per query head
    lin_den = torch.matmul(fqg, k_sum[..., None])
    if dec is not None:  # token p0 + a reads the state (held relative to p0) times lambda^a
        read = _age_weight(dec, (new_pos - p0)[:, None])  # [1, Hk, kg, n, 1]
        lin_num, lin_den = lin_num * read, lin_den * read
        kv, k_sum = kv * torch.exp(dec * n), k_sum * torch.exp(dec * n)[..., 0]  # now relative to p0 + n
    o = _ungrouped(_divide(num + lin_num, den + lin_den)).to(v.dtype)

    # 4. keep the newest wb slots
    new_state = HybridState(
        kv, k_sum, buf_k[:, :, n:], buf_v[:, :, n:], buf_ok[:, n:],
        win_kf=None if buf_kf is None else buf_kf[:, :, n:], position=p0 + n,
        sink_k=sink_k, sink_v=sink_v, sink_pos=sink_pos,
        glob_k=glob[0], glob_v=glob[1], glob_kf=glob[2], glob_valid=glob[3], glob_pos=glob[4],
    )
    return o, new_state


def _memory_segments(q, k, v, fq, gamma, *, state: HybridState | None, key_map: KeyMap, window: int,
                     memory: Memory, scale, softcap, key_mask, key_map_input, feature_dim: int, key_groups: int,
                     segment: int, log_decay=None, memory_query=None) -> tuple[torch.Tensor, HybridState]:
    """Run `_memory_segment` over the sequence, at most `segment` tokens at a time, never across
    a selection: segment = P vectorises each interval (chunked form), 1 is the recurrent form."""
    B, T, H, D = q.shape
    Hk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    if state is None:
        state = empty_state(B, Hk, key_groups, feature_dim, D, v.shape[-1], window, q.dtype, q.device,
                            memory=memory, key_input_dim=None if key_map_input is None else key_map_input.shape[-1])
    elif (state.win_kf is None) != (key_map_input is None):
        raise ValueError("key_map_input must be given exactly when the state buffers key-map inputs")
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    P = memory.period
    outs, t = [], 0
    while t < T:
        n = min(segment, P - state.position % P, T - t)
        kf = None if key_map_input is None else key_map_input[:, t : t + n]
        o, state = _memory_segment(
            state, q[:, t : t + n], k[:, t : t + n], v[:, t : t + n], fq[:, t : t + n], kf, valid[:, t : t + n],
            gamma, key_map, window=window, memory=memory, scale=scale, softcap=softcap, log_decay=log_decay,
            mq=None if memory_query is None else memory_query[:, t : t + n],
        )
        outs.append(o)
        t += n
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), state


@_exact_dtypes
def hybrid_attention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, gamma: torch.Tensor,
    *, state: HybridState, key_map: KeyMap, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, memory: Memory | None = None, key_map_input: torch.Tensor | None = None,
    log_decay: torch.Tensor | None = None, memory_query: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """Token-by-token form for decoding: o [B, T, H, Dv] and the updated state.

    Each new key enters the window buffer; the keys that leave the band are featurised with
    key_map (from their key-map inputs) and added to (S, z), or kept exact as sinks / in the global
    cache. Only raw keys are buffered, so the state stays small. The window length is the state's.
    """
    memory = memory or NO_MEMORY
    state = state.ordered()
    window = state.win_valid.shape[1] - memory.period + 1
    if window < 0 or (memory.sinks and state.sink_k is None) or (memory.global_size and state.glob_k is None):
        raise ValueError("the state was not built for this memory: make it with empty_state(..., memory=memory) "
                         "or by a prefill with the same memory")
    memory = check_memory(memory, window)
    if state.win_kf is not None and key_map_input is None:
        raise ValueError("the state buffers separate key-map inputs: pass key_map_input")
    kf = key_map_input if state.win_kf is not None else None
    check_memory_query(memory_query, q, kf)
    check_decay(log_decay, state.kv.shape[1] * state.kv.shape[2])
    return _memory_segments(
        q, k, v, fq, gamma, state=state, key_map=key_map, window=window, memory=memory, scale=scale,
        softcap=softcap, key_mask=key_mask, key_map_input=kf, feature_dim=state.kv.shape[-2],
        key_groups=state.kv.shape[2], segment=1, log_decay=log_decay, memory_query=memory_query,
    )
