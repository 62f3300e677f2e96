"""A deterministic generator of tiny chat conversations, shipped as ``builtin:tiny_chat``.

Built from the tiny-stories vocabulary (:mod:`loongforge.data.synthetic_corpus`), so the shipped
tokenizer covers it with few tokens per word. Conversations mix lengths on purpose (one-line
answers, multi-turn exchanges, whole stories), which exercises truncation, packing and data-parallel
load balancing; the answers are regular enough (animal sounds, small sums, greetings, stories)
that a tiny model's SFT loss falls within a few steps.

Regenerate the shipped file with
``python -c "from loongforge.data.synthetic_chat import write_chat_set as w; w()"``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from loongforge.data.synthetic_corpus import CHARACTERS, COLORS, OBJECTS, _Pick, generate_story

DEFAULT_NUM_CONVERSATIONS = 600
DEFAULT_SEED = 4321
CHAT_FILE = "tiny_chat.jsonl"

SYSTEM_PROMPTS = [
    "You are a kind helper who tells stories for children.",
    "You are a friendly helper. Give short and happy answers.",
]
SOUNDS = {"dog": "woof", "cow": "moo", "cat": "meow", "duck": "quack", "bird": "tweet", "bear": "growl",
          "bunny": "nothing much, it just wiggles its nose"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _story_turns(p: _Pick) -> list[dict]:
    story = generate_story(p)
    ask = p(["Tell me a story.", "Can you tell me a short story?", "Please tell me a story for bedtime."])
    turns = [{"role": "user", "content": ask}, {"role": "assistant", "content": story}]
    if p.chance(0.5):
        name = min((story.find(n), n) for n, _, _ in CHARACTERS if n in story)[1]
        turns += [{"role": "user", "content": "Who is the story about?"},
                  {"role": "assistant", "content": f"The story is about {name}."}]
    return turns


def _sound_turns(p: _Pick) -> list[dict]:
    animal = p(sorted(SOUNDS))
    return [{"role": "user", "content": f"What does a {animal} say?"},
            {"role": "assistant", "content": f"A {animal} says {SOUNDS[animal]}."}]


def _sum_turns(p: _Pick) -> list[dict]:
    a, b = int(p(range(6))), int(p(range(5)))
    return [{"role": "user", "content": f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?"},
            {"role": "assistant", "content": f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."}]


def _greeting_turns(p: _Pick) -> list[dict]:
    name = p(CHARACTERS)[0]
    color, obj = p(COLORS), p(OBJECTS)
    return [{"role": "user", "content": f"Hi! My name is {name}."},
            {"role": "assistant", "content": f"Hello {name}! It is nice to meet you. How can I help you today?"},
            {"role": "user", "content": f"I have a {color} {obj}."},
            {"role": "assistant", "content": f"What a nice {color} {obj}, {name}! I hope you have fun with it."}]


def generate_conversations(num: int = DEFAULT_NUM_CONVERSATIONS, seed: int = DEFAULT_SEED) -> list[list[dict]]:
    """``num`` conversations (OpenAI ``messages``), identical for identical arguments."""
    p = _Pick(seed)
    kinds = [_story_turns, _sound_turns, _sum_turns, _greeting_turns]
    out = []
    for _ in range(num):
        messages = []
        if p.chance(0.3):
            messages.append({"role": "system", "content": p(SYSTEM_PROMPTS)})
        messages += p(kinds)(p)
        if p.chance(0.25):  # a second, short exchange
            messages += p(kinds[1:3])(p)
        out.append(messages)
    return out


def write_chat_set(path: str | Path | None = None, num: int = DEFAULT_NUM_CONVERSATIONS, seed: int = DEFAULT_SEED) -> Path:
    """Write the conversations as JSON lines ``{"messages": [...]}`` (default: into the package)."""
    path = Path(path) if path is not None else Path(str(resources.files("loongforge.assets"))) / CHAT_FILE
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for messages in generate_conversations(num, seed):
            f.write(json.dumps({"messages": messages}, ensure_ascii=True) + "\n")
    return path
