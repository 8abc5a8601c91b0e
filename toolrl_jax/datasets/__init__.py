"""ToolRL data: the example type, readers/writers, raw-source converters, the mix builder, tokenized batching
and the built-in synthetic task set."""
from toolrl_jax.datasets.batching import BatchingConfig, PromptBatch, PromptDataset, chat_encoder
from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.datasets.io import DataFileError, read_examples, read_json, read_parquet, write_parquet, write_sft_json
from toolrl_jax.datasets.mix import MixConfig, build_mix
from toolrl_jax.datasets.sources import ConversionReport, convert_file
from toolrl_jax.datasets.stats import example_stats
from toolrl_jax.datasets.synthetic import SyntheticConfig, make_synthetic_split

__all__ = ["BatchingConfig", "ConversionReport", "DataFileError", "MixConfig", "PromptBatch", "PromptDataset",
           "SyntheticConfig", "ToolRLExample", "build_mix", "chat_encoder", "convert_file", "example_stats",
           "make_synthetic_split", "read_examples", "read_json", "read_parquet", "write_parquet", "write_sft_json"]
