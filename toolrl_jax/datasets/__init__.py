"""ToolRL data: the example type, readers/writers, raw-source converters, the mix builder, tokenized batching
and the built-in synthetic task set."""
from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.datasets.io import (DataFileError, read_examples, read_json, read_parquet, write_parquet,
                                    write_sft_json)

__all__ = ["ToolRLExample", "DataFileError", "read_examples", "read_json", "read_parquet", "write_parquet",
           "write_sft_json"]
