"""PromptDataset: left truncation, left padding and masks at token level, buckets, deterministic order, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from toolrl_jax.datasets import BatchingConfig, PromptDataset, ToolRLExample
from toolrl_jax.datasets.batching import default_buckets, left_pad


def fake_encode(messages):
    """A trivial tokenizer: one id per character of the joined contents (ids 3.., never the pad id 0)."""
    text = "|".join(m["content"] for m in messages)
    return [3 + (ord(c) % 200) for c in text]


def make_examples(n: int, seed: int = 0) -> list[ToolRLExample]:
    rng = np.random.default_rng(seed)
    return [ToolRLExample([{"role": "system", "content": "S"},
                           {"role": "user", "content": f"{i}:" + "x" * int(rng.integers(1, 90))}],
                          "<think> t </think>\n<response> r </response>", i, "test") for i in range(n)]


def test_left_pad_masks_and_positions():
    ids, mask, positions = left_pad([[5, 6, 7], [8], []], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert ids.dtype == mask.dtype == positions.dtype == np.int32
    with pytest.raises(ValueError, match="more than the padded length"):
        left_pad([[1, 2, 3]], 2, 0)


def test_left_truncation_keeps_prompt_end_and_masks_padding():
    examples = make_examples(40)
    config = BatchingConfig(batch_size=8, max_prompt_length=48, shuffle=False, sort_window=1, drop_last=False,
                            pad_id=0)
    ds = PromptDataset(examples, fake_encode, config)
    full = [fake_encode(e.prompt_messages) for e in examples]
    assert ds.num_truncated == sum(len(f) > 48 for f in full) > 0
    seen = 0
    for indices in ds.epoch_batches(0):
        batch = ds.make_batch(indices)
        b, length = batch.input_ids.shape
        assert length in config.buckets and b == len(indices)
        assert length == min(x for x in config.buckets if x >= batch.lengths.max())
        for row, i in enumerate(batch.indices):
            expected = full[i][-48:]  # LEFT truncation: the last 48 tokens survive
            n = len(expected)
            assert batch.lengths[row] == n and bool(batch.truncated[row]) == (len(full[i]) > 48)
            np.testing.assert_array_equal(batch.input_ids[row, length - n:], expected)
            np.testing.assert_array_equal(batch.input_ids[row, :length - n], 0)
            np.testing.assert_array_equal(batch.attention_mask[row], [0] * (length - n) + [1] * n)
            np.testing.assert_array_equal(batch.positions[row, length - n:], np.arange(n))
            assert list(batch.prompt_ids[row]) == expected
            assert batch.examples[row] is ds.examples[i]
        seen += b
    assert seen == 40


def test_truncation_modes():
    examples = make_examples(20)
    longest = max(len(fake_encode(e.prompt_messages)) for e in examples)
    n_long = sum(len(fake_encode(e.prompt_messages)) > 40 for e in examples)
    dropped = PromptDataset(examples, fake_encode, BatchingConfig(batch_size=2, max_prompt_length=40,
                                                                  truncation="drop"))
    assert dropped.num_dropped == n_long and len(dropped) == 20 - n_long and dropped.num_truncated == 0
    with pytest.raises(ValueError, match="prompt tokens > max_prompt_length=40"):
        PromptDataset(examples, fake_encode, BatchingConfig(batch_size=2, max_prompt_length=40, truncation="error"))
    fits = PromptDataset(examples, fake_encode, BatchingConfig(batch_size=2, max_prompt_length=longest,
                                                               truncation="error"))
    assert fits.num_truncated == 0


def test_epoch_covers_each_example_once_and_order_is_seeded():
    examples = make_examples(103)
    config = BatchingConfig(batch_size=10, max_prompt_length=128, seed=5, order="length_grouped", sort_window=4)
    ds = PromptDataset(examples, fake_encode, config)
    batches = ds.epoch_batches(0)
    assert ds.batches_per_epoch == 10 and all(len(b) == 10 for b in batches)  # 103 // 10, last partial dropped
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == 100
    keep_all = PromptDataset(examples, fake_encode, BatchingConfig(batch_size=10, max_prompt_length=128, seed=5,
                                                                   drop_last=False))
    assert sorted(np.concatenate(keep_all.epoch_batches(0)).tolist()) == list(range(103))
    same = PromptDataset(examples, fake_encode, config)
    assert all(np.array_equal(a, b) for a, b in zip(batches, same.epoch_batches(0)))
    assert any(not np.array_equal(a, b) for a, b in zip(batches, ds.epoch_batches(1)))
    other_seed = PromptDataset(examples, fake_encode, BatchingConfig(batch_size=10, max_prompt_length=128, seed=6,
                                                                     order="length_grouped", sort_window=4))
    assert any(not np.array_equal(a, b) for a, b in zip(batches, other_seed.epoch_batches(0)))


def test_length_bucketing_reduces_padding():
    examples = make_examples(400, seed=1)

    def padding(sort_window: int) -> float:
        ds = PromptDataset(examples, fake_encode, BatchingConfig(batch_size=16, max_prompt_length=128, seed=0,
                                                                 order="length_grouped",
                                                                 sort_window=sort_window,
                                                                 bucket_lengths=tuple(range(8, 129, 8))))
        total = real = 0
        for indices in ds.epoch_batches(0):
            batch = ds.make_batch(indices)
            total += batch.attention_mask.size
            real += batch.attention_mask.sum()
        return 1 - real / total

    assert padding(16) < 0.5 * padding(1)


def test_resume_matches_uninterrupted_run():
    examples = make_examples(57)
    config = BatchingConfig(batch_size=8, max_prompt_length=64, seed=3)
    reference = PromptDataset(examples, fake_encode, config)
    expected = [reference.next_batch() for _ in range(20)]  # 7 batches per epoch: crosses two epoch boundaries
    assert reference.epoch == 2

    first = PromptDataset(examples, fake_encode, config)
    for _ in range(9):
        first.next_batch()
    saved = json.loads(json.dumps(first.state()))  # survives a JSON checkpoint
    resumed = PromptDataset(examples, fake_encode, config)
    resumed.restore(saved)
    for want in expected[9:]:
        got = resumed.next_batch()
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.indices, want.indices)
    # Restoring at an epoch boundary (batch_in_epoch == batches_per_epoch) is valid too.
    edge = PromptDataset(examples, fake_encode, config)
    edge.restore({**saved, "epoch": 0, "batch_in_epoch": 7})
    np.testing.assert_array_equal(edge.next_batch().indices, expected[7].indices)


def test_restore_rejects_other_data_or_config():
    examples = make_examples(30)
    config = BatchingConfig(batch_size=4, max_prompt_length=64, seed=3)
    state = PromptDataset(examples, fake_encode, config).state()
    with pytest.raises(ValueError, match="fingerprint"):
        PromptDataset(examples, lambda m: fake_encode(m)[:-1], config).restore(state)
    with pytest.raises(ValueError, match="seed"):
        PromptDataset(examples, fake_encode, BatchingConfig(batch_size=4, max_prompt_length=64, seed=4)
                      ).restore(state)
    with pytest.raises(ValueError, match="batch_size"):
        PromptDataset(examples, fake_encode, BatchingConfig(batch_size=5, max_prompt_length=64, seed=3)
                      ).restore(state)
    with pytest.raises(ValueError, match="invalid data position"):
        PromptDataset(examples, fake_encode, config).restore({**state, "batch_in_epoch": 99})


def test_config_validation():
    assert default_buckets(300) == (32, 64, 128, 256, 300)
    assert default_buckets(256) == (32, 64, 128, 256)
    with pytest.raises(ValueError, match="bucket_lengths"):
        BatchingConfig(batch_size=1, max_prompt_length=64, bucket_lengths=(16, 32))
    with pytest.raises(ValueError, match="truncation"):
        BatchingConfig(batch_size=1, max_prompt_length=64, truncation="right")
    with pytest.raises(ValueError, match="cannot fill one batch"):
        PromptDataset(make_examples(3), fake_encode, BatchingConfig(batch_size=4, max_prompt_length=64))


def _length_examples(lengths: np.ndarray) -> list[ToolRLExample]:
    """Examples whose `length_encode` prompt has exactly lengths[i] tokens."""
    return [ToolRLExample([{"role": "user", "content": str(int(n))}], "<response> r </response>", i, "test")
            for i, n in enumerate(lengths)]


def length_encode(messages):
    return [7] * int(messages[0]["content"])


def _ks_statistic(sample: np.ndarray, population: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.union1d(sample, population)
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / x.size  # noqa: E731
    return float(np.max(np.abs(cdf(sample) - cdf(population))))


def test_default_order_draws_uniform_random_steps_like_the_original():
    """The ToolRL recipe's data: 3,920 prompts, 512 per step (7 steps and 336 left over per epoch), 15 epochs.
    The original (veRL: DataLoader(shuffle=True, drop_last=True)) draws uniform random batches, so over the run every
    prompt is drawn and every step's length distribution is the whole set's."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(700), 0.45, 3920), 80, 2048).astype(int)
    ds = PromptDataset(_length_examples(lengths), length_encode,
                       BatchingConfig(batch_size=512, max_prompt_length=2048, seed=0))
    assert ds.config.order == "random" and ds.batches_per_epoch == 7
    drawn, remainders, ks = np.zeros(len(lengths), int), [], []
    for epoch in range(15):
        batches = ds.epoch_batches(epoch)
        flat = np.concatenate(batches)
        assert len(set(flat.tolist())) == 7 * 512  # no repeats within an epoch
        remainders.append(frozenset(set(range(len(lengths))) - set(flat.tolist())))
        drawn[flat] += 1
        ks.extend(_ks_statistic(lengths[b], lengths) for b in batches)
    assert np.all(drawn > 0), f"{np.sum(drawn == 0)} prompts never drawn in 15 epochs"
    assert len(set(remainders)) == 15  # a different random remainder sits out each epoch
    # 105 steps of 512: every step's lengths look like the whole set's (KS critical value at alpha=1e-3 ~ 0.091)
    assert max(ks) < 0.1, max(ks)
    step_means = [lengths[b].mean() for e in range(15) for b in ds.epoch_batches(e)]
    standard_error = lengths.std() / np.sqrt(512)
    assert np.max(np.abs(np.array(step_means) - lengths.mean())) < 4 * standard_error

    # The explicit length-grouped option, for contrast: each step covers a narrow length band, and since the window
    # (512 x 16) exceeds the data, the 336 longest prompts are the dropped remainder of every epoch.
    grouped = PromptDataset(_length_examples(lengths), length_encode,
                            BatchingConfig(batch_size=512, max_prompt_length=2048, seed=0, order="length_grouped"))
    grouped_drawn = np.zeros(len(lengths), int)
    for epoch in range(15):
        for b in grouped.epoch_batches(epoch):
            grouped_drawn[b] += 1
            assert _ks_statistic(lengths[b], lengths) > 0.3
    never = np.flatnonzero(grouped_drawn == 0)
    assert len(never) == 336 and lengths[never].min() >= np.sort(lengths)[-336]


def test_default_order_resumes_the_data_position_exactly():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 60, 3920)
    config = BatchingConfig(batch_size=512, max_prompt_length=64, seed=11)
    reference = PromptDataset(_length_examples(lengths), length_encode, config)
    expected = [reference.next_batch().indices for _ in range(7 * 15)]  # the recipe's 105 draws
    interrupted = PromptDataset(_length_examples(lengths), length_encode, config)
    for _ in range(52):  # mid-epoch 7
        interrupted.next_batch()
    saved = json.loads(json.dumps(interrupted.state()))
    assert saved["order"] == "random"
    resumed = PromptDataset(_length_examples(lengths), length_encode, config)
    resumed.restore(saved)
    for want in expected[52:]:
        np.testing.assert_array_equal(resumed.next_batch().indices, want)
    with pytest.raises(ValueError, match="order"):  # a position of the other order is not this run's
        PromptDataset(_length_examples(lengths), length_encode,
                      BatchingConfig(batch_size=512, max_prompt_length=64, seed=11, order="length_grouped")
                      ).restore(saved)


def test_positions_saved_before_the_order_option_restore_as_length_grouped():
    examples = make_examples(57)
    config = BatchingConfig(batch_size=8, max_prompt_length=64, seed=3, order="length_grouped")
    reference = PromptDataset(examples, fake_encode, config)
    expected = [reference.next_batch().indices for _ in range(12)]
    old_state = {k: v for k, v in reference.state().items() if k != "order"}
    old_state.update(epoch=0, batch_in_epoch=5)
    resumed = PromptDataset(examples, fake_encode, config)
    resumed.restore(old_state)
    np.testing.assert_array_equal(resumed.next_batch().indices, expected[5])
    with pytest.raises(ValueError, match="order must be one of"):
        BatchingConfig(batch_size=1, max_prompt_length=8, order="sorted")
