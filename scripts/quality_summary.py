"""Issue 12's summary table, built from the raw long-context JSON files.

    python3 scripts/quality_summary.py [--out FILE.md] [--json FILE.json]

Prints one Markdown table (one row per mechanism, a SmolLM2 block and a Gemma-3 block) and
optionally writes it to --out and its numbers to --json. Every number is read from
reports/long_context/*.json (written by scripts/gpu/long_context.py) and
reports/long_context/five_task_limit100/*.json (written by `lolcats eval --tasks paper
--limit 100`); a cell with no measurement is "-". The rows are chosen in ROWS below.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple

LONG = Path(__file__).resolve().parents[1] / "reports" / "long_context"
FIVE = LONG / "five_task_limit100"

BUCKETS = ["0-64", "64-256", "256-1024", "1024-2048", "2048-4096", "4096-8192"]
LENGTHS = ["1024", "2048", "4096", "8192"]
# The 5-task average of QUALITY.md: the mean of these five metrics (lm-eval names).
TASK_METRICS = {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm",
                "hellaswag": "acc_norm", "winogrande": "acc"}
DECODE_TOKENS = 33  # decode_seconds_33_after_1k: 33 greedy tokens after a 1K prompt, batch 1


class Row(NamedTuple):
    label: str
    file: str | None     # in reports/long_context/; None: not measured (every cell "-")
    variant: str | None  # key of the file's "rows"
    five_task: str | None = None  # in five_task_limit100/, for the same delta; None: not measured


# Where each row comes from. The first row of each block is its teacher: the reference of the
# position-bucket ratios. A setting switched on after training is stored as its own variant,
# named BASE+SETTING ("sinks_nope+gc64": run 2's sinks_nope delta with a 64-pair cache).
ROWS: dict[str, list[Row]] = {
    "SmolLM2-135M": [
        # run 18 measured the teacher again (identical perplexities to run 1's)
        Row("teacher (softmax)", "run18_teacher_h2048_p128_trained.json", "teacher",
            "teacher.json"),
        # run 1; the 5-task file is "the default recipe at the same 1M + 1M budget" (QUALITY.md),
        # its delta not named there
        Row("paper default (window 64)", "run1_teacher_default.json", "default", "default.json"),
        Row("window 256", None, None),  # no long-context run of window 256
        Row("sinks 4", "run4_nope_sinks.json", "sinks"),  # run 4
        # runs 2 and 5: the same sinks 4 + pre-RoPE delta, the cache switched on after training
        Row("global cache 64 (sinks 4 + pre-RoPE, after training)", "run2_sinks_nope.json",
            "sinks_nope+gc64"),
        Row("global cache 128, dedup 0.95 (sinks 4 + pre-RoPE, after training)",
            "run5_sinks_nope_gc128dd.json", "sinks_nope_dd+gc128dd"),
        Row("4 softmax layers kept (sinks 4 + pre-RoPE)", "run6_softmax4.json",
            "sinks_nope_softmax4"),  # run 6
        # run 12 (run 11's recipe: sinks, pre-RoPE, gc128 dedup, decay 1K); run 3 has 4K blocks too
        Row("stage-2 blocks 4K (run 11's recipe)", "run12_gc128dd_decay1k_s2_4k.json",
            "sinks_nope_gc128dd_decay1k_s2_4k", "run12.json"),
        Row("current default, --memory long (run 18)", "run18_teacher_h2048_p128_trained.json",
            "recipe_h2048_p128", "run18.json"),
    ],
    "Gemma-3-270M": [
        # G4's teacher (G1, G3 and G4 measured the same perplexities)
        Row("teacher (softmax)", "gemma_run4_h2048_p128.json", "teacher", "gemma_teacher.json"),
        Row("paper default (window 64)", "gemma_run3_md256_default_decay256.json", "default"),  # G3
        Row("window 256", None, None),
        Row("sinks 4", None, None),  # only measured together with a cache (next row)
        Row("global cache 64 + sinks 4 (after training)", "gemma_run3_md256_default_decay256.json",
            "default+sinks4+gc64"),  # G3
        Row("global cache 256 (G4's delta, after training)", "gemma_run5_gc256_inference.json",
            "g_budget+gc256"),  # G5
        Row("softmax layers kept", None, None),  # not run on Gemma
        Row("stage-2 blocks 4K", None, None),  # not run on Gemma
        Row("current default, --memory long (G4)", "gemma_run4_h2048_p128.json",
            "recipe_h2048_p128", "gemma_run4.json"),
        # G6; the script appends the row's lora_layers to these labels
        Row("G6: --memory long", "gemma_run6_gc256_lora_layers.json", "recipe_h2048_p128_conv"),
        Row("G6: --memory long + gc256 trained in place", "gemma_run6_gc256_lora_layers.json",
            "recipe_h2048_p128_gc256"),
        Row("G6: --memory long + gc256 trained in place", "gemma_run6_gc256_lora_layers.json",
            "recipe_h2048_p128_gc256_conv", "gemma_run6_gc256_conv.json"),
    ],
}

Json = dict[str, Any]


def load_row(row: Row) -> Json:
    """The variant's raw row, or {} when the row was not measured."""
    if row.file is None:
        return {}
    return json.loads((LONG / row.file).read_text())["rows"][row.variant]


def five_task_average(name: str | None) -> float | None:
    """Mean of TASK_METRICS over the file's tasks, in percent."""
    if name is None:
        return None
    tasks = json.loads((FIVE / name).read_text())["tasks"]
    return 100 * sum(tasks[t]["metrics"][m] for t, m in TASK_METRICS.items()) / len(TASK_METRICS)


def ratio(x: float | None, ref: float | None) -> float | None:
    return None if x is None or ref is None else x / ref


def percent_by_length(task: Json | None) -> dict[str, float | None]:
    accuracy = (task or {}).get("by_length", {})
    return {n: None if n not in accuracy else 100 * accuracy[n] for n in LENGTHS}


def measure(row: Row, raw: Json, teacher: Json) -> Json:
    """The table's numbers for one row (None: not measured)."""
    position = raw.get("position_ppl", {})
    decode = raw.get("decode_seconds_33_after_1k")
    label = row.label + (f", LoRA on {raw['lora_layers']} layers" if "lora_layers" in raw else "")
    return {
        "label": label,
        "source": None if row.file is None else f"{row.file}:{row.variant}",
        "state_mib_8k": raw.get("state_mib_8k"),
        "decode_tokens_per_s": None if decode is None else DECODE_TOKENS / decode,
        "sharegpt_ppl": raw.get("sharegpt_ppl"),
        "sharegpt_ratio_control": ratio(raw.get("sharegpt_ppl"), raw.get("control_sharegpt_ppl")),
        "wikitext_ppl": raw.get("wikitext_ppl"),
        "wikitext_ratio_control": ratio(raw.get("wikitext_ppl"), raw.get("control_wikitext_ppl")),
        "position_ppl": {b: position.get(b) for b in BUCKETS},
        "position_ratio_teacher": {b: ratio(position.get(b), teacher["position_ppl"][b])
                                   for b in BUCKETS},
        "five_task_avg": five_task_average(row.five_task),
        "five_task_source": row.five_task,
        "passkey_pct": percent_by_length(raw.get("passkey")),
        "niah_pct": percent_by_length(raw.get("niah_single")),
    }


def num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def with_ratio(x: float | None, r: float | None, spec: str) -> str:
    return num(x, ".2f") + ("" if r is None else f" ({r:{spec}}x)")


def lengths_cell(pct: dict[str, float | None]) -> str:
    if all(v is None for v in pct.values()):
        return "-"
    return "/".join(num(v, ".0f") for v in pct.values())


HEADER = (["model", "row", "source", "state MiB/seq 8K", "decode tok/s",
           "ShareGPT (/control)", "WikiText-2 (/control)"]
          + [f"{b} (/teacher)" for b in BUCKETS]
          + ["5-task avg", "passkey % 1K/2K/4K/8K", "niah % 1K/2K/4K/8K"])


def markdown(model: str, m: Json) -> str:
    cells = [model, m["label"], m["source"] or "-", num(m["state_mib_8k"], ".1f"),
             num(m["decode_tokens_per_s"], ".1f"),
             with_ratio(m["sharegpt_ppl"], m["sharegpt_ratio_control"], ".3f"),
             with_ratio(m["wikitext_ppl"], m["wikitext_ratio_control"], ".3f")]
    cells += [with_ratio(m["position_ppl"][b], m["position_ratio_teacher"][b], ".2f")
              for b in BUCKETS]
    cells += [num(m["five_task_avg"], ".1f"), lengths_cell(m["passkey_pct"]),
              lengths_cell(m["niah_pct"])]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--json", type=Path, help="write the table's numbers here")
    args = parser.parse_args()

    blocks: dict[str, list[Json]] = {}
    for model, rows in ROWS.items():
        teacher = load_row(rows[0])
        blocks[model] = [measure(row, load_row(row), teacher) for row in rows]

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += [markdown(model, m) for model, ms in blocks.items() for m in ms]
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(blocks, indent=1) + "\n")


if __name__ == "__main__":
    main()
