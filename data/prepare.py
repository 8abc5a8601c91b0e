"""Builds a ToolRL RL mix (train/test parquet in the ToolRL schema) from raw and existing sources.

  python -m data.prepare --source=toolace:PATH --source=hammer:PATH --source=xlam:PATH --out=DIR \
      [--count=toolace:2000 --count=hammer:1000 --count=xlam:1000] [--tokenizer=HF_FOLDER --max_prompt_length=2048]

Source kinds: toolace / hammer / xlam (raw files, converted to single-step examples), toolrl (an existing RL
parquet or SFT JSON, taken as is once every row is checked), synthetic:N (N examples of the built-in synthetic
task set). Writes DIR/train.parquet, DIR/test.parquet, DIR/stats.json (sizes, tool calls per example, token
lengths and truncation under --tokenizer) and DIR/conversion_report.json (every raw row that could not be
converted, with file and row).

Nothing is lost: the files are written to a temporary folder next to DIR that then replaces DIR in one rename (a
crash leaves the old DIR intact); DIR may hold only these four files; a split with fewer rows than the one it would
replace is refused unless --overwrite_smaller; a source that yields no examples stops the run (exit code 1, nothing
written). toolrl sources have every row's ground truth parsed; --bad_rows chooses between stopping at bad rows
and leaving them out (listed in conversion_report.json).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags, logging

from toolrl_jax.datasets import (
    ConversionReport,
    DataFileError,
    MixConfig,
    SyntheticConfig,
    build_mix,
    convert_file,
    example_stats,
    make_synthetic_split,
    write_parquet,
)
from toolrl_jax.datasets.loading import BAD_ROW_POLICIES, load_examples
from toolrl_jax.datasets.output_folder import OutputError, check_replaceable, staged_folder
from toolrl_jax.datasets.records import bulleted

RAW_KINDS = ("toolace", "hammer", "xlam")
KINDS = (*RAW_KINDS, "toolrl", "synthetic")
TRAIN, TEST, STATS, REPORT = OUTPUTS = ("train.parquet", "test.parquet", "stats.json", "conversion_report.json")

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
flags.DEFINE_bool("overwrite_smaller", False,
                  "Replace an existing --out even when its new train or test split has fewer rows than the old one.")
flags.DEFINE_enum("bad_rows", "error", list(BAD_ROW_POLICIES),
                  "toolrl sources: a row with a bad layout or ground truth stops the run (error, naming file and "
                  "row) or is left out and listed in conversion_report.json (skip).")
flags.mark_flag_as_required("out")


def _split_spec(spec: str, flag: str) -> tuple[str, str]:
    kind, sep, value = spec.partition(":")
    if not sep or not value or kind not in KINDS:
        raise app.UsageError(f"--{flag}={spec!r}: expected KIND:VALUE with KIND in {KINDS}")
    return kind, value


class PrepareError(Exception):
    """A run that would write no data or lose some (nothing has been written)."""


def _source_examples(spec: str, kind: str, value: str, report: ConversionReport) -> list:
    if kind == "synthetic":
        try:
            n = int(value)
        except ValueError:
            raise app.UsageError(f"--source={spec!r}: synthetic takes a count, e.g. synthetic:2000") from None
        return make_synthetic_split(n, 0, seed=FLAGS.synthetic_seed, config=SyntheticConfig())[0]
    if not Path(value).is_file():
        raise app.UsageError(f"--source={spec!r}: no such file")
    if kind == "toolrl":  # checked rows; those left out under --bad_rows=skip go to the report
        loaded = load_examples(value, bad_rows=FLAGS.bad_rows)
        report.add_unreadable("toolrl", loaded.skipped)
        return loaded.examples
    options = {"string_values": FLAGS.toolace_string_values} if kind == "toolace" \
        else {"empty_calls": FLAGS.empty_calls}
    return convert_file(kind, value, report=report, **options)


def load_pools(sources: list[str], report: ConversionReport) -> dict[str, list]:
    """Examples per source kind (several files of a kind are pooled). PrepareError when a source yields none."""
    pools: dict[str, list] = {}
    for spec in sources:
        kind, value = _split_spec(spec, "source")
        seen = len(report.failed), len(report.skipped)
        examples = _source_examples(spec, kind, value, report)
        if not examples:
            issues = report.failed[seen[0]:] + report.skipped[seen[1]:]
            raise PrepareError(f"--source={spec} yields no examples ({len(issues)} row(s) failed or skipped):"
                               + bulleted([str(issue) for issue in issues]))
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


def prepare(counts: dict[str, int]) -> None:
    """Loads, mixes and writes; raises PrepareError / OutputError / DataFileError before writing anything."""
    out = Path(FLAGS.out)
    check_replaceable(out, OUTPUTS, {}, FLAGS.overwrite_smaller)  # a foreign folder fails before the slow part
    report = ConversionReport()
    pools = load_pools(FLAGS.source, report)
    missing = set(counts) - set(pools)
    if missing:
        raise app.UsageError(f"--count given for kind(s) {sorted(missing)} with no --source")
    train, test = build_mix(pools, MixConfig(seed=FLAGS.seed, test_fraction=FLAGS.test_fraction, counts=counts))
    if not train and not test:
        raise PrepareError(f"the mix has no rows (--count={FLAGS.count})")
    check_replaceable(out, OUTPUTS, {TRAIN: len(train), TEST: len(test)}, FLAGS.overwrite_smaller,
                      how_to_allow="pass --overwrite_smaller")
    encode, encode_response = _encoders(FLAGS.tokenizer)
    stats = {
        "seed": FLAGS.seed, "test_fraction": FLAGS.test_fraction, "counts": counts, "sources": FLAGS.source,
        "tokenizer": FLAGS.tokenizer,
        "conversion": {k: v for k, v in report.to_dict().items() if k not in ("failed", "skipped")},
        "train": example_stats(train, encode, encode_response, FLAGS.max_prompt_length if encode else None),
        "test": example_stats(test, encode, encode_response, FLAGS.max_prompt_length if encode else None),
    }
    with staged_folder(out) as stage:
        write_parquet(train, stage / TRAIN)
        write_parquet(test, stage / TEST)
        (stage / STATS).write_text(json.dumps(stats, indent=2) + "\n")
        (stage / REPORT).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(report.summary())
    for issue in report.failed[:20]:
        print(f"  failed: {issue}")
    if len(report.failed) > 20:
        print(f"  ... {len(report.failed) - 20} more in {out / REPORT}")
    print(json.dumps({"train": stats["train"], "test": stats["test"]}, indent=2))
    print(f"wrote {len(train)} train / {len(test)} test rows to {out}")


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
    try:
        prepare(counts)
    except (PrepareError, OutputError, DataFileError) as err:
        print(f"data.prepare: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
