"""A built-in synthetic ToolRL task set (no external data), for smoke runs and small-model RL.

Ten everyday tools (weather, time zone, currency conversion, calculator, translation, stock price, flight search,
reminders, news, restaurants). Each example lists a few tools in the ToolRL system-prompt rendering and asks one
templated request. Cases, in BFCL's terms:

* simple: one tool listed, one call;  multiple: 2-3 tools listed, one call;
* parallel: the same tool called twice in one turn;  parallel_multiple: two different tools in one turn;
* no_tool: small talk, or a request for a tool that is not listed; the reference is a `<response>` only.

Every argument value appears verbatim in the request, so a small instruct model can partly solve the task out of
the box (format, tool choice, copying values) and improve with RL (exact keys, optional parameters, parallel calls,
not calling tools when none fits). Ground truths use the exact ToolRL layout and placeholder thoughts.

`prompt_style="compact"` uses a short instruction block instead of ToolRL's long one (the tool blocks are rendered
identically in both styles). With the default 2 listed tools, compact prompts are ~155-330 tokens (mean ~235)
under SmolLM2's chat template; `max_tools=3` adds ~25 tokens on average.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from typing import Any, Literal

from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.datasets.format import (
    SYSTEM_FOOTER,
    SYSTEM_HEADER,
    ToolSpec,
    format_assistant_turn,
    format_user,
    prompt_messages,
    render_system_prompt,
)

COMPACT_HEADER = "You can call these tools:\n"
COMPACT_FOOTER = (
    "\n\nAnswer as\n"
    "<think> reasoning </think>\n"
    "<tool_call>\n"
    '{"name": "tool name", "parameters": {"key": "value"}}\n'
    "</tool_call>\n"
    "with one line per call, or, if no tool fits, as\n"
    "<think> reasoning </think>\n"
    "<response> answer </response>")

CASES = ("simple", "multiple", "parallel", "parallel_multiple", "no_tool")


def _p(description: str, type_: str, default: Any = "") -> dict[str, Any]:
    return {"description": description, "type": type_, "default": default}


TOOLS: dict[str, ToolSpec] = {t.name: t for t in [
    ToolSpec("get_weather", "Get the current weather in a city.",
             {"city": _p("City name.", "str"), "unit": _p("celsius or fahrenheit.", "str", "celsius")}),
    ToolSpec("get_time", "Get the local time in a time zone.",
             {"timezone": _p("IANA time zone.", "str")}),
    ToolSpec("convert_currency", "Convert money between currencies.",
             {"amount": _p("Amount.", "float"), "from_currency": _p("Source currency code.", "str"),
              "to_currency": _p("Target currency code.", "str")}),
    ToolSpec("calculate", "Evaluate an arithmetic expression.",
             {"expression": _p("The expression.", "str")}),
    ToolSpec("translate_text", "Translate text into a language.",
             {"text": _p("Text to translate.", "str"), "target_language": _p("Target language.", "str")}),
    ToolSpec("get_stock_price", "Get the latest price of a stock.",
             {"symbol": _p("Ticker symbol.", "str")}),
    ToolSpec("search_flights", "Search flights between two cities.",
             {"origin": _p("Departure city.", "str"), "destination": _p("Arrival city.", "str"),
              "date": _p("Date, YYYY-MM-DD.", "str")}),
    ToolSpec("set_reminder", "Set a reminder.",
             {"message": _p("What to remind.", "str"), "time": _p("When.", "str")}),
    ToolSpec("get_news", "Get news headlines on a topic.",
             {"topic": _p("News topic.", "str"), "count": _p("Number of headlines.", "int", 5)}),
    ToolSpec("find_restaurants", "Find restaurants in a city.",
             {"city": _p("City name.", "str"), "cuisine": _p("Type of food.", "str")}),
]}

_CITIES = ["Paris", "Tokyo", "London", "Berlin", "Madrid", "Rome", "Sydney", "Toronto", "Cairo", "Seoul", "Mumbai",
           "Lima", "Oslo", "Nairobi", "Chicago", "Boston", "Dublin", "Vienna", "Lisbon", "Bangkok"]
_TIMEZONES = ["Europe/Paris", "Asia/Tokyo", "Europe/London", "America/New_York", "Australia/Sydney",
              "America/Chicago", "Asia/Seoul", "Africa/Cairo", "Europe/Berlin", "America/Toronto"]
_CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CAD", "AUD", "CHF", "INR"]
_LANGUAGES = ["French", "Spanish", "German", "Italian", "Japanese", "Portuguese"]
_PHRASES = ["good morning", "thank you very much", "where is the station", "I love this city", "see you tomorrow",
            "how much does it cost", "the meeting is at noon", "happy birthday"]
_SYMBOLS = ["AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "META", "NFLX"]
_TASKS = ["call mom", "buy milk", "water the plants", "pay the rent", "walk the dog", "submit the report",
          "book a dentist appointment", "take my medicine"]
_TIMES = ["6 PM", "7:30 AM", "noon", "9 AM", "8:15 PM", "tomorrow morning"]
_TOPICS = ["sports", "technology", "science", "politics", "health", "business", "music"]
_CUISINES = ["Italian", "Thai", "Mexican", "Indian", "Japanese", "vegan", "Greek"]
_OPS = ["+", "-", "*", "/"]

Intent = Callable[[random.Random], tuple[str, dict[str, Any]]]


def _weather(rng: random.Random) -> tuple[str, dict[str, Any]]:
    city = rng.choice(_CITIES)
    if rng.random() < 0.3:
        unit = rng.choice(["celsius", "fahrenheit"])
        text = rng.choice(["What is the weather in {c} in {u}?", "Tell me the temperature in {c} in {u}."])
        return text.format(c=city, u=unit), {"city": city, "unit": unit}
    text = rng.choice(["What's the weather like in {c}?", "How is the weather in {c} right now?",
                       "Is it raining in {c}?"])
    return text.format(c=city), {"city": city}


def _time(rng: random.Random) -> tuple[str, dict[str, Any]]:
    tz = rng.choice(_TIMEZONES)
    text = rng.choice(["What time is it in the {t} time zone?", "Tell me the current time in {t}."])
    return text.format(t=tz), {"timezone": tz}


def _currency(rng: random.Random) -> tuple[str, dict[str, Any]]:
    amount = rng.choice([5, 10, 20, 50, 75, 100, 120, 250, 500, 1000, 1500])
    src, dst = rng.sample(_CURRENCIES, 2)
    text = rng.choice(["Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?"])
    return text.format(a=amount, s=src, d=dst), {"amount": amount, "from_currency": src, "to_currency": dst}


def _calculate(rng: random.Random) -> tuple[str, dict[str, Any]]:
    expression = f"{rng.randint(2, 999)} {rng.choice(_OPS)} {rng.randint(2, 99)}"
    text = rng.choice(["Calculate {e}.", "What is {e}?", "Please compute {e}."])
    return text.format(e=expression), {"expression": expression}


def _translate(rng: random.Random) -> tuple[str, dict[str, Any]]:
    phrase, language = rng.choice(_PHRASES), rng.choice(_LANGUAGES)
    text = rng.choice(['Translate "{p}" into {l}.', 'How do you say "{p}" in {l}?'])
    return text.format(p=phrase, l=language), {"text": phrase, "target_language": language}


def _stock(rng: random.Random) -> tuple[str, dict[str, Any]]:
    symbol = rng.choice(_SYMBOLS)
    text = rng.choice(["What is the stock price of {s}?", "Get me the latest {s} share price."])
    return text.format(s=symbol), {"symbol": symbol}


def _flights(rng: random.Random) -> tuple[str, dict[str, Any]]:
    origin, destination = rng.sample(_CITIES, 2)
    date = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    text = rng.choice(["Find flights from {o} to {d} on {t}.", "I need a flight from {o} to {d} on {t}."])
    return text.format(o=origin, d=destination, t=date), {"origin": origin, "destination": destination, "date": date}


def _reminder(rng: random.Random) -> tuple[str, dict[str, Any]]:
    task, when = rng.choice(_TASKS), rng.choice(_TIMES)
    text = rng.choice(["Remind me to {m} at {t}.", "Set a reminder to {m} at {t}."])
    return text.format(m=task, t=when), {"message": task, "time": when}


def _news(rng: random.Random) -> tuple[str, dict[str, Any]]:
    topic = rng.choice(_TOPICS)
    if rng.random() < 0.4:
        count = rng.randint(2, 9)
        return f"Give me {count} news headlines about {topic}.", {"topic": topic, "count": count}
    text = rng.choice(["What is the latest news about {t}?", "Show me today's {t} headlines."])
    return text.format(t=topic), {"topic": topic}


def _restaurants(rng: random.Random) -> tuple[str, dict[str, Any]]:
    city, cuisine = rng.choice(_CITIES), rng.choice(_CUISINES)
    text = rng.choice(["Find {k} restaurants in {c}.", "Where can I eat {k} food in {c}?"])
    return text.format(k=cuisine, c=city), {"city": city, "cuisine": cuisine}


INTENTS: dict[str, Intent] = {
    "get_weather": _weather, "get_time": _time, "convert_currency": _currency, "calculate": _calculate,
    "translate_text": _translate, "get_stock_price": _stock, "search_flights": _flights, "set_reminder": _reminder,
    "get_news": _news, "find_restaurants": _restaurants,
}

UNAVAILABLE_REPLY = "Sorry, none of the available tools can help with that request."
# (request, reference reply) pairs that no listed tool serves.
_NO_TOOL = [
    ("Hi there! How are you today?", "Hello! I'm doing well, thank you. How can I help you today?"),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field!"),
    ("Thanks, that is all I needed.", "You're welcome! Have a great day."),
    ("What is your name?", "I'm a helpful assistant that can use tools to answer your questions."),
    ("Can you write a short poem about the sea?",
     "The sea rolls in with silver light, it hums its song all through the night."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("Good night!", "Good night! Sleep well."),
    ("What does the word 'ephemeral' mean?", "'Ephemeral' means lasting for a very short time."),
]


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """prompt_style: "compact" (short instructions) or "full" (ToolRL's system prompt). max_tools: tools listed in
    the multiple / parallel_multiple / no_tool cases (2..max_tools). case_weights: relative frequency of CASES."""
    prompt_style: Literal["compact", "full"] = "compact"
    max_tools: int = 2
    case_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: {
        "simple": 0.2, "multiple": 0.3, "parallel": 0.15, "parallel_multiple": 0.15, "no_tool": 0.2})

    def __post_init__(self) -> None:
        if self.prompt_style not in ("compact", "full"):
            raise ValueError(f"prompt_style must be 'compact' or 'full', got {self.prompt_style!r}")
        if not 2 <= self.max_tools < len(TOOLS):
            raise ValueError(f"max_tools must be in [2, {len(TOOLS) - 1}], got {self.max_tools}")
        unknown = set(self.case_weights) - set(CASES)
        if unknown or not any(w > 0 for w in self.case_weights.values()) \
                or any(w < 0 for w in self.case_weights.values()):
            raise ValueError(f"case_weights must be non-negative weights over {CASES} with a positive one, "
                             f"got {dict(self.case_weights)}")


def _system(tools: list[ToolSpec], style: str) -> str:
    if style == "compact":
        return render_system_prompt(tools, COMPACT_HEADER, COMPACT_FOOTER)
    return render_system_prompt(tools, SYSTEM_HEADER, SYSTEM_FOOTER)


def _join(first: str, second: str, rng: random.Random) -> str:
    return f"{first} {rng.choice(['Also,', 'And', 'Then'])} {second[0].lower()}{second[1:]}"


def _listed(rng: random.Random, needed: list[str], n_tools: int) -> list[ToolSpec]:
    others = rng.sample([n for n in TOOLS if n not in needed], n_tools - len(needed))
    names = list(dict.fromkeys(needed)) + others
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


def sample_example(rng: random.Random, config: SyntheticConfig = SyntheticConfig()
                   ) -> tuple[str, list[dict[str, str]], str]:
    """One (case, prompt messages, ground truth) drawn from `rng`."""
    cases = [c for c in CASES if config.case_weights.get(c, 0) > 0]
    case = rng.choices(cases, weights=[config.case_weights[c] for c in cases])[0]
    n_tools = rng.randint(2, config.max_tools)
    if case == "no_tool":
        if rng.random() < 0.5:  # small talk
            request, reply = rng.choice(_NO_TOOL)
            tools = _listed(rng, [], n_tools)
        else:  # a tool request whose tool is not listed
            missing = rng.choice(list(TOOLS))
            request, _ = INTENTS[missing](rng)
            tools = [TOOLS[n] for n in rng.sample([n for n in TOOLS if n != missing], n_tools)]
            reply = UNAVAILABLE_REPLY
        truth = format_assistant_turn(response=reply)
    elif case in ("simple", "multiple"):
        name = rng.choice(list(TOOLS))
        request, args = INTENTS[name](rng)
        tools = [TOOLS[name]] if case == "simple" else _listed(rng, [name], n_tools)
        truth = format_assistant_turn(calls=[(name, args)])
    elif case == "parallel":
        name = rng.choice(list(TOOLS))
        first, args1 = INTENTS[name](rng)
        second, args2 = INTENTS[name](rng)
        while args2 == args1:
            second, args2 = INTENTS[name](rng)
        request = _join(first, second, rng)
        tools = [TOOLS[name]] if rng.random() < 0.5 else _listed(rng, [name], n_tools)
        truth = format_assistant_turn(calls=[(name, args1), (name, args2)])
    else:  # parallel_multiple
        name1, name2 = rng.sample(list(TOOLS), 2)
        first, args1 = INTENTS[name1](rng)
        second, args2 = INTENTS[name2](rng)
        request = _join(first, second, rng)
        tools = _listed(rng, [name1, name2], max(n_tools, 2))
        truth = format_assistant_turn(calls=[(name1, args1), (name2, args2)])
    return case, prompt_messages(_system(tools, config.prompt_style), [format_user(request)]), truth


def make_synthetic_split(n_train: int, n_test: int, seed: int = 0, config: SyntheticConfig = SyntheticConfig()
                         ) -> tuple[list[ToolRLExample], list[ToolRLExample]]:
    """(train, test) synthetic examples, deterministic in `seed`; no prompt occurs twice (within or across
    splits)."""
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    drawn: list[tuple[list[dict[str, str]], str]] = []
    attempts, limit = 0, 50 * (n_train + n_test) + 1000
    while len(drawn) < n_train + n_test:
        attempts += 1
        if attempts > limit:
            raise ValueError(f"could not draw {n_train + n_test} distinct synthetic prompts (got {len(drawn)}); "
                             "ask for fewer examples or widen the configuration")
        _, messages, truth = sample_example(rng, config)
        key = (messages[0]["content"], messages[1]["content"])
        if key in seen:
            continue
        seen.add(key)
        drawn.append((messages, truth))

    def build(items: list[tuple[list[dict[str, str]], str]], split: str) -> list[ToolRLExample]:
        return [ToolRLExample(prompt_messages=m, ground_truth=t, index=i, source="synthetic", split=split)
                for i, (m, t) in enumerate(items)]

    return build(drawn[:n_train], "train"), build(drawn[n_train:], "test")
