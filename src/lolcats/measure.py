"""What the linearize report measures: held-out perplexity and a greedy sample.

    ppl = perplexity(model, splits.val, micro_batch_size=8, dtype="bfloat16")   # {"ppl", "response_ppl", ...}
    sample = greedy_sample(model, tokenizer, "What are three tips for staying healthy?")
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lolcats.runtime import autocast, model_device
from lolcats.train.lora import next_token_nll

logger = logging.getLogger(__name__)

__all__ = ["perplexity", "greedy_sample"]

Progress = Callable[[dict[str, Any]], None]


@torch.no_grad()
def perplexity(
    model: nn.Module, blocks, *, micro_batch_size: int = 4, dtype: str = "float32",
    device: torch.device | str | None = None, progress: Progress | None = None, name: str = "eval",
) -> dict[str, float]:
    """Next-token perplexity over all tokens of `blocks` and over the response tokens (labels)."""
    device = model_device(model, device)
    was_training = model.training
    model.eval()
    nll_all = nll_resp = 0.0
    n_all = n_resp = 0
    n = len(blocks)
    total = math.ceil(n / micro_batch_size)
    t0 = time.perf_counter()
    try:
        for i, s in enumerate(range(0, n, micro_batch_size)):
            ids = blocks.input_ids[s : s + micro_batch_size].to(device)
            labels = blocks.labels[s : s + micro_batch_size].to(device)
            with autocast(device, dtype):
                logits = model(input_ids=ids, use_cache=False).logits
            a, na = next_token_nll(logits, ids)
            r, nr = next_token_nll(logits, labels)
            nll_all += float(a)
            n_all += int(na)
            nll_resp += float(r)
            n_resp += int(nr)
            del logits
            if progress is not None:
                progress({"event": "eval_progress", "name": name, "done": i + 1, "total": total,
                          "tokens": (s + ids.shape[0]) * ids.shape[1]})
    finally:
        model.train(was_training)
    out = {
        "ppl": math.exp(nll_all / max(n_all, 1)),
        "nll": nll_all / max(n_all, 1),
        "tokens": n_all,
        "response_ppl": math.exp(nll_resp / n_resp) if n_resp else float("nan"),
        "response_tokens": n_resp,
        "seconds": time.perf_counter() - t0,
    }
    return out


@torch.no_grad()
def greedy_sample(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40) -> dict[str, Any]:
    """Greedy continuation of a chat prompt: model.generate, else a plain loop of full forwards."""
    device = model_device(model)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    method = "generate"
    try:
        try:
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            )
            new = out[0, ids.shape[1]:]
        except Exception as e:  # noqa: BLE001 - generate() of the hybrid model may not work yet
            logger.warning("model.generate failed (%s: %s); using a plain greedy loop", type(e).__name__, e)
            method = "greedy-loop"
            seq = ids
            for _ in range(max_new_tokens):
                logits = model(input_ids=seq, use_cache=False).logits[:, -1]
                nxt = logits.argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
                if eos is not None and int(nxt) == eos:
                    break
            new = seq[0, ids.shape[1]:]
    finally:
        model.train(was_training)
    new = new.tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return {"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True).strip(),
            "tokens": len(new), "method": method}
