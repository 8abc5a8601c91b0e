"""Builds a ToolRL RL mix (train/test parquet in the ToolRL schema) from raw and existing sources.

  python -m data.prepare --source=toolace:PATH --source=hammer:PATH --source=xlam:PATH --out=DIR \
      [--count=toolace:2000 --count=hammer:1000 --count=xlam:1000] [--tokenizer=HF_FOLDER --max_prompt_length=2048]

Source kinds: toolace / hammer / xlam (raw files, converted to single-step examples), toolrl (an existing RL
parquet or SFT JSON, taken as is), synthetic:N (N examples of the built-in synthetic task set). Writes
DIR/train.parquet, DIR/test.parquet, DIR/stats.json (sizes, tool calls per example, token lengths and truncation
under --tokenizer) and DIR/conversion_report.json (every raw row that could not be converted, with file and row).
"""
from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags, logging

from toolrl_jax.datasets import (ConversionReport, MixConfig, SyntheticConfig, build_mix, convert_file,
                                 example_stats, make_synthetic_split, read_examples, write_parquet)

RAW_KINDS = ("toolace", "hammer", "xlam")
KINDS = (*RAW_KINDS, "toolrl", "synthetic")

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("source", [], f"KIND:PATH (KIND in {KINDS}; for synthetic, synthetic:N). Repeatable.")
flags.DEFINE_string("out", None, "Output folder for train.parquet, test.parquet, stats.json, conversion_report.json.")
flags.DEFINE_multi_string("count", [], "KIND:N: keep at most N examples of that kind (seeded sample). Repeatable.")
flags.DEFINE_integer("seed", 31415, "Shuffle / subsample seed (ToolRL used 31415).")
flags.DEFINE_float("test_fraction", 0.02, "Fraction of the shuffled mix (the last rows) that becomes the test split.")
flags.DEFINE_string("tokenizer", None, "HF tokenizer folder; when given, token-length stats use its chat template.")
flags.DEFINE_integer("max_prompt_length", 2048, "Prompt token budget for the truncation count in the stats.")
flags.DEFINE_enum("empty_calls", "skip", ["skip", "response"],
                  "Hammer/xLAM rows whose reference has no call: skip them, or keep them as <response> examples.")
flags.DEFINE_bool("toolace_string_values", True,
                  "Write ToolACE call arguments as strings, as ToolRL's mix does (1 -> \"1\").")
flags.DEFINE_integer("synthetic_seed", 0, "Seed of synthetic:N sources.")
flags.mark_flag_as_required("out")


def _split_spec(spec: str, flag: str) -> tuple[str, str]:
    kind, sep, value = spec.partition(":")
    if not sep or not value or kind not in KINDS:
        raise app.UsageError(f"--{flag}={spec!r}: expected KIND:VALUE with KIND in {KINDS}")
    return kind, value


def load_pools(sources: list[str], report: ConversionReport) -> dict[str, list]:
    """Examples per source kind (several files of a kind are pooled)."""
    pools: dict[str, list] = {}
    for spec in sources:
        kind, value = _split_spec(spec, "source")
        if kind == "synthetic":
            try:
                n = int(value)
            except ValueError:
                raise app.UsageError(f"--source={spec!r}: synthetic takes a count, e.g. synthetic:2000") from None
            examples, _ = make_synthetic_split(n, 0, seed=FLAGS.synthetic_seed, config=SyntheticConfig())
        elif kind == "toolrl":
            examples = read_examples(value)
        else:
            if not Path(value).is_file():
                raise app.UsageError(f"--source={spec!r}: no such file")
            options = {"string_values": FLAGS.toolace_string_values} if kind == "toolace" \
                else {"empty_calls": FLAGS.empty_calls}
            examples = convert_file(kind, value, report=report, **options)
        logging.info("%s: %d examples from %s", kind, len(examples), value)
        pools.setdefault(kind, []).extend(examples)
    return pools


def _encoders(tokenizer_folder: str | None):
    if not tokenizer_folder:
        return None, None
    from toolrl_jax.tokenization import encode_chat, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_folder)
    return (lambda messages: encode_chat(tokenizer, messages),
            lambda text: tokenizer.encode(text, add_special_tokens=False))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.source:
        raise app.UsageError("give at least one --source=KIND:PATH")
    counts = {}
    for spec in FLAGS.count:
        kind, value = _split_spec(spec, "count")
        try:
            counts[kind] = int(value)
        except ValueError:
            raise app.UsageError(f"--count={spec!r}: N must be an integer") from None
    report = ConversionReport()
    pools = load_pools(FLAGS.source, report)
    missing = set(counts) - set(pools)
    if missing:
        raise app.UsageError(f"--count given for kind(s) {sorted(missing)} with no --source")
    train, test = build_mix(pools, MixConfig(seed=FLAGS.seed, test_fraction=FLAGS.test_fraction, counts=counts))

    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(train, out / "train.parquet")
    write_parquet(test, out / "test.parquet")
    encode, encode_response = _encoders(FLAGS.tokenizer)
    stats = {
        "seed": FLAGS.seed, "test_fraction": FLAGS.test_fraction, "counts": counts, "sources": FLAGS.source,
        "tokenizer": FLAGS.tokenizer,
        "conversion": {k: v for k, v in report.to_dict().items() if k not in ("failed", "skipped")},
        "train": example_stats(train, encode, encode_response, FLAGS.max_prompt_length if encode else None),
        "test": example_stats(test, encode, encode_response, FLAGS.max_prompt_length if encode else None),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (out / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(report.summary())
    for issue in report.failed[:20]:
        print(f"  failed: {issue}")
    if len(report.failed) > 20:
        print(f"  ... {len(report.failed) - 20} more in {out / 'conversion_report.json'}")
    print(json.dumps({"train": stats["train"], "test": stats["test"]}, indent=2))
    print(f"wrote {len(train)} train / {len(test)} test rows to {out}")


if __name__ == "__main__":
    app.run(main)
