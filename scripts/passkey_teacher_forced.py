"""Teacher-forced passkey diagnostic (CPU): how well a model predicts the pass key after the prompt.

One forward of prompt + " " + answer per sample; prints, for each memory setting, the mean NLL per
answer token and how many samples get every answer token right. Cheaper and more graded than
greedy generation, so budgets and selection rules can be compared on a CPU.

    python3 scripts/passkey_teacher_forced.py DELTA 2048 global_cache_size=0 global_cache_size=128,global_cache_dedup=0.95
    python3 scripts/passkey_teacher_forced.py teacher 2048 -        # the softmax base
    python3 scripts/passkey_teacher_forced.py DELTA 2048 mode=softmax  # the control: softmax + the delta's LoRA
    ... --scale-linear 0.3                                          # phi(q) scaled: less linear-state mass
"""
from __future__ import annotations

import argparse
import time

import torch

import lolcats
from lolcats.attention.layer import LolcatsAttention, set_mode
from lolcats.eval.needles import build_sample
from lolcats.loading import embedded_default_path


def _scale_query_features(factor: float) -> None:
    features = LolcatsAttention._features

    def scaled(self, q, k, unrotated):
        fq, fk, kf = features(self, q, k, unrotated)
        return fq * factor, fk, kf

    LolcatsAttention._features = scaled


def _setting(spec: str) -> dict:
    if spec == "-":
        return {}
    pairs = (item.split("=") for item in spec.split(","))
    return {k: v if k == "mode" else float(v) if "." in v else int(v) for k, v in pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("delta", help="delta folder, or 'teacher' for the base")
    ap.add_argument("length", type=int)
    ap.add_argument("settings", nargs="+", help="configure_memory settings k=v,k=v ('-': as trained)")
    ap.add_argument("--base", default=None, help="base model (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--scale-linear", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.scale_linear is not None:
        _scale_query_features(args.scale_linear)
    base = args.base or str(embedded_default_path())
    tok = lolcats.load_tokenizer(base)
    if args.delta == "teacher":
        model = lolcats.load_base(base, dtype="float32")
    else:
        model = lolcats.from_pretrained(args.delta, base_model=base, dtype="float32")
    model.eval()
    samples = [build_sample(tok, "passkey", args.length, float(d), seed=0, index=i)
               for d in args.depths.split(",") for i in range(args.samples)]
    for spec in args.settings:
        setting = _setting(spec)
        if args.delta != "teacher":
            set_mode(model, setting.pop("mode", "hybrid"))  # "softmax": the same LoRA on exact attention
            if setting:
                lolcats.configure_memory(model, **setting)
        t, nll, exact = time.perf_counter(), [], 0
        for s in samples:
            answer = tok(" " + s.answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([s.input_ids + answer])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(s.input_ids) - 1: -1].float()
            target = torch.tensor(answer)
            nll.append(-torch.log_softmax(logits, -1)[torch.arange(len(answer)), target].mean().item())
            exact += int((logits.argmax(-1) == target).all())
        print(f"{spec:48s} L={args.length} nll={sum(nll) / len(nll):.3f} exact={exact}/{len(samples)} "
              f"{time.perf_counter() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
