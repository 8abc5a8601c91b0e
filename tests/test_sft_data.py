"""SFT tokenization (assistant-turn loss masks at token level, template checks, truncation) and batching (packing
layout, bucketing, seeded order, resumable position). No model needed."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.datasets.synthetic import make_synthetic_split
from toolrl_jax.tokenization import encode_chat, load_tokenizer, render_chat
from toolrl_jax.training.sft_data import (
    SFTBatchingConfig,
    SFTDataset,
    SFTSequence,
    TemplateError,
    pack_best_fit,
    tokenize_examples,
)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def examples():
    train, _ = make_synthetic_split(12, 0, seed=3)
    return train


def _segments(batch, micro: int, row: int):
    """[(segment id, slice)] of one row of a batch."""
    seg = batch.segment_ids[micro, row]
    out = []
    for s in sorted(set(seg.tolist()) - {0}):
        where = np.flatnonzero(seg == s)
        assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "a segment must be contiguous"
        out.append((s, slice(where[0], where[-1] + 1)))
    return out


def test_assistant_tokens_only_carry_loss_smollm2(tok, examples):
    seqs, report = tokenize_examples(tok, examples, max_length=4096)
    assert report.num_kept == len(examples) and report.num_dropped == report.num_truncated == 0
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for seq in seqs:
        ex = examples[seq.example_index]
        prompt = seq.input_ids[:seq.prompt_length].tolist()
        target = seq.input_ids[seq.prompt_length:].tolist()
        # The prompt is exactly what the sampler is given at rollout time.
        assert prompt == encode_chat(tok, ex.prompt_messages, add_generation_prompt=True)
        assert target[-1] == im_end and target.count(im_end) == 1
        assert tok.decode(target, skip_special_tokens=False) == ex.ground_truth + "<|im_end|>"
        # Training tokens agree with the template's own rendering of the whole conversation (its trailing
        # newline after <|im_end|> is not trained).
        full = render_chat(tok, [*ex.prompt_messages, {"role": "assistant", "content": ex.ground_truth}],
                           add_generation_prompt=False)
        assert tok.encode(full, add_special_tokens=False) == prompt + target + tok.encode("\n",
                                                                                          add_special_tokens=False)
        np.testing.assert_array_equal(seq.loss_mask, [0] * len(prompt) + [1] * len(target))

    # In a batch, the weighted positions predict exactly the assistant tokens, nothing else.
    data = SFTDataset(seqs, SFTBatchingConfig(batch_size=len(seqs), micro_batch_size=4, max_length=1024,
                                              packing=True, shuffle=False))
    batch = data.make_batch(np.arange(len(seqs)))
    seen = []
    for m in range(batch.input_ids.shape[0]):
        for r in range(batch.input_ids.shape[1]):
            for _, sl in _segments(batch, m, r):
                w = batch.loss_weights[m, r, sl]
                predicted = batch.target_ids[m, r, sl][w > 0].tolist()
                ids = batch.input_ids[m, r, sl]
                seq = next(q for q in seqs if len(q) == len(ids) and np.array_equal(q.input_ids, ids))
                seen.append(seq.example_index)
                assert predicted == seq.input_ids[seq.prompt_length:].tolist()
                assert tok.decode(predicted, skip_special_tokens=False) == \
                    examples[seq.example_index].ground_truth + "<|im_end|>"
                # Each weighted position's target is the next input token of the same example.
                pos = np.flatnonzero(w > 0)
                np.testing.assert_array_equal(batch.target_ids[m, r, sl][pos], ids[pos + 1])
    assert sorted(seen) == list(range(len(examples)))
    assert batch.num_target_tokens == sum(s.num_targets for s in seqs)


def _with_template(smollm2_dir, template: str):
    t = load_tokenizer(smollm2_dir)
    t.chat_template = template
    return t


_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + CONTENT + '<|im_end|>\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_template_that_trims_is_accepted_and_rewriting_templates_are_rejected(smollm2_dir):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    ex = ToolRLExample(prompt_messages=msgs, ground_truth="<think> t </think>\n<response> r </response>\n\n",
                       index=0, source="t")
    trims = _with_template(smollm2_dir, _CHATML.replace("CONTENT", "(m['content'] | trim)"))
    (seq,), _ = tokenize_examples(trims, [ex], max_length=512)
    assert trims.decode(seq.input_ids[seq.prompt_length:]) == ex.ground_truth.strip() + "<|im_end|>"

    drops_thinking = _with_template(smollm2_dir, _CHATML.replace(
        "CONTENT", "(m['content'].split('</think>')[-1] if m['role'] == 'assistant' else m['content'])"))
    with pytest.raises(TemplateError, match="rewrites the assistant content"):
        tokenize_examples(drops_thinking, [ex], max_length=512)

    prefix_differs = _with_template(smollm2_dir, "{% if messages[-1]['role'] == 'assistant' %}X{% endif %}"
                                    + _CHATML.replace("CONTENT", "m['content']"))
    with pytest.raises(TemplateError, match="example 0 .*prefix"):
        tokenize_examples(prefix_differs, [ex], max_length=512)

    no_end = _with_template(smollm2_dir, _CHATML.replace("CONTENT", "m['content']").replace(
        "'<|im_end|>\\n' }}{% endfor %}", "('<|im_end|>\\n' if m['role'] != 'assistant' else '') }}{% endfor %}"))
    with pytest.raises(TemplateError, match="end-of-turn"):
        tokenize_examples(no_end, [ex], max_length=512)


def test_left_truncation_and_dropping_are_counted(tok, examples):
    full, _ = tokenize_examples(tok, examples, max_length=4096)
    max_length, max_prompt = 80, 40
    seqs, report = tokenize_examples(tok, examples, max_length=max_length, max_prompt_length=max_prompt)
    expect_dropped = [s.example_index for s in full if s.num_targets > max_length - 1]
    assert expect_dropped, "the test needs some targets that do not fit"
    assert list(report.dropped_indices) == expect_dropped and report.num_dropped == len(expect_dropped)
    assert report.num_kept == len(examples) - len(expect_dropped) == len(seqs)
    by_index = {s.example_index: s for s in full}
    for seq in seqs:
        ref = by_index[seq.example_index]
        assert len(seq) <= max_length and seq.prompt_length <= max_prompt
        keep = min(max_prompt, max_length - ref.num_targets)
        assert seq.prompt_length == min(keep, ref.prompt_length)
        # The END of the prompt is kept (it holds the generation prompt) and the target is untouched.
        np.testing.assert_array_equal(seq.input_ids[:seq.prompt_length],
                                      ref.input_ids[ref.prompt_length - seq.prompt_length:ref.prompt_length])
        np.testing.assert_array_equal(seq.input_ids[seq.prompt_length:], ref.input_ids[ref.prompt_length:])
        assert seq.truncated == (seq.prompt_length < ref.prompt_length)
    assert report.num_truncated == sum(s.truncated for s in seqs) > 0
    with pytest.raises(ValueError, match="vocabulary"):
        tokenize_examples(tok, examples[:1], max_length=4096, vocab_size=100)


def test_pack_best_fit():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 50, size=rng.integers(1, 30)).tolist()
        rows = pack_best_fit(lengths, 64)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
        # Best fit never leaves two rows that could be merged into one.
        fills = sorted(sum(lengths[i] for i in row) for row in rows)
        assert len(fills) < 2 or fills[0] + fills[1] > 64
    assert pack_best_fit([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="capacity"):
        pack_best_fit([9], 8)


def _toy_sequences(n: int, seed: int = 0) -> list[SFTSequence]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, t = int(rng.integers(1, 20)), int(rng.integers(1, 12))
        out.append(SFTSequence(input_ids=rng.integers(3, 1000, p + t).astype(np.int32), prompt_length=p,
                               example_index=i, truncated=False))
    return out


def test_packed_batch_layout():
    seqs = _toy_sequences(23)
    cfg = SFTBatchingConfig(batch_size=10, micro_batch_size=3, max_length=40, packing=True, seed=1, pad_id=0,
                            bucket_lengths=(16, 32, 40))
    data = SFTDataset(seqs, cfg)
    assert data.batches_per_epoch == 3  # 10 + 10 + 3 (the last batch is smaller, not dropped)
    sizes = []
    for _ in range(3):
        batch = data.next_batch()
        sizes.append(batch.num_examples)
        num_micro, micro, length = batch.input_ids.shape
        assert micro == 3 and length in (16, 32, 40)
        found = []
        for m in range(num_micro):
            for r in range(micro):
                segs = _segments(batch, m, r)
                assert [s for s, _ in segs] == list(range(1, len(segs) + 1))
                end = segs[-1][1].stop if segs else 0
                assert not batch.segment_ids[m, r, end:].any() and not batch.loss_weights[m, r, end:].any()
                for _, sl in segs:
                    np.testing.assert_array_equal(batch.positions[m, r, sl], np.arange(sl.stop - sl.start))
                    ids = batch.input_ids[m, r, sl]
                    seq = next(q for q in seqs if np.array_equal(q.input_ids, ids))
                    found.append(seq.example_index)
                    assert batch.loss_weights[m, r, sl].sum() == seq.num_targets
                    # No loss on the last token of a segment (nothing of this example follows it).
                    assert batch.loss_weights[m, r, sl.stop - 1] == 0
        assert sorted(found) == sorted(batch.indices.tolist())
        assert batch.num_target_tokens == sum(seqs[i].num_targets for i in batch.indices)
    assert sizes == [10, 10, 3]


def test_bucketed_batches_one_example_per_row():
    seqs = _toy_sequences(16, seed=2)
    data = SFTDataset(seqs, SFTBatchingConfig(batch_size=4, micro_batch_size=2, max_length=32, packing=False,
                                              bucket_lengths=(8, 16, 32), sort_window=4, seed=0))
    for _ in range(data.batches_per_epoch):
        batch = data.next_batch()
        assert batch.input_ids.shape[:2] == (2, 2)
        rows = batch.input_ids.reshape(4, -1)
        seg = batch.segment_ids.reshape(4, -1)
        longest = max(len(seqs[i]) for i in batch.indices)
        assert rows.shape[1] == min(b for b in (8, 16, 32) if b >= longest)
        for row, i in enumerate(batch.indices):
            n = len(seqs[i])
            np.testing.assert_array_equal(rows[row, :n], seqs[i].input_ids)  # right padding
            assert set(seg[row, :n].tolist()) == {1} and not seg[row, n:].any()
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        SFTBatchingConfig(batch_size=5, micro_batch_size=2, max_length=32, packing=False)


def test_order_is_seeded_per_epoch_and_the_position_resumes():
    seqs = _toy_sequences(10)
    cfg = SFTBatchingConfig(batch_size=4, micro_batch_size=2, max_length=40, packing=True, seed=5)
    a, b = SFTDataset(seqs, cfg), SFTDataset(seqs, cfg)
    assert [x.tolist() for x in a.epoch_batches(0)] == [x.tolist() for x in b.epoch_batches(0)]
    assert [x.tolist() for x in a.epoch_batches(0)] != [x.tolist() for x in a.epoch_batches(1)]
    other = SFTDataset(seqs, dataclasses.replace(cfg, seed=6))
    assert [x.tolist() for x in a.epoch_batches(0)] != [x.tolist() for x in other.epoch_batches(0)]
    for epoch in range(2):
        assert sorted(np.concatenate(a.epoch_batches(epoch)).tolist()) == list(range(10))

    straight = [a.next_batch().indices.tolist() for _ in range(7)]  # crosses two epoch boundaries (3 per epoch)
    for _ in range(4):
        b.next_batch()
    state = b.state()
    resumed = SFTDataset(seqs, cfg)
    resumed.restore(state)
    assert [resumed.next_batch().indices.tolist() for _ in range(3)] == straight[4:]
    with pytest.raises(ValueError, match="seed"):
        other.restore(state)
    with pytest.raises(ValueError, match="fingerprint"):
        SFTDataset(_toy_sequences(10, seed=9), cfg).restore(state)
