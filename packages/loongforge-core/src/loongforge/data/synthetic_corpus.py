"""A deterministic generator of tiny English stories, and the shipped default assets built from it.

Why: the default training run must work offline on a laptop CPU in minutes, so we ship our own
corpus instead of downloading one. The stories are grammatical, short and very regular (a few plot
templates filled from word lists, with names and objects that recur inside a story), so a model of
a few million parameters visibly learns them in a few hundred steps: it picks up the templates
and, with luck, to reuse the character's name and pronoun later in the story.

Determinism: only ``random.Random(seed).random()`` is used (its output is stable across Python
versions), and the files are written byte-for-byte reproducibly, so :func:`build_default_assets`
regenerates exactly the shipped ``tiny_stories.jsonl`` and ``tokenizer/``.
"""

from __future__ import annotations

import json
import os
import random
from importlib import resources
from pathlib import Path

from loongforge.data.errors import DataError

#: Parameters of the shipped assets; change them only together with regenerating the files.
DEFAULT_NUM_STORIES = 4000
DEFAULT_SEED = 1234
#: An upper bound: BPE stops merging once every word of this small corpus is one token, so the
#: shipped tokenizer has ~1022 entries (the demo model's vocab_size 1024 relies on that).
DEFAULT_VOCAB_SIZE = 2048
CORPUS_FILE = "tiny_stories.jsonl"
TOKENIZER_DIR = "tokenizer"
BUILTIN_CORPORA = {"tiny_stories": CORPUS_FILE}

# --- word lists ----------------------------------------------------------------------------------
# (name, kind, "he"/"she"); kinds are nouns usable after "a little".
CHARACTERS = [
    ("Lily", "girl", "she"),
    ("Tom", "boy", "he"),
    ("Mia", "girl", "she"),
    ("Ben", "boy", "he"),
    ("Anna", "girl", "she"),
    ("Sam", "boy", "he"),
    ("Lucy", "girl", "she"),
    ("Jack", "boy", "he"),
    ("Emma", "girl", "she"),
    ("Leo", "boy", "he"),
    ("Zoe", "girl", "she"),
    ("Tim", "boy", "he"),
    ("Spot", "dog", "he"),
    ("Daisy", "cow", "she"),
    ("Max", "dog", "he"),
    ("Kitty", "cat", "she"),
    ("Bob", "bear", "he"),
    ("Rosie", "bunny", "she"),
    ("Pip", "bird", "he"),
    ("Molly", "duck", "she"),
]
ADJECTIVES = ["little", "kind", "brave", "curious", "happy", "shy", "clever", "friendly", "small", "funny"]
HOMES = [
    "in a small house near the woods",
    "in a big red house",
    "in a little house by the sea",
    "on a farm with many animals",
    "in a cozy house in the town",
    "in a white house on a hill",
]
# (name, phrase for being there)
PLACES = [
    ("the park", "in the park"),
    ("the garden", "in the garden"),
    ("the beach", "on the beach"),
    ("the forest", "in the forest"),
    ("the farm", "on the farm"),
    ("the lake", "by the lake"),
    ("the hill", "on the hill"),
    ("the yard", "in the yard"),
]
COLORS = ["red", "blue", "green", "yellow", "pink", "orange", "purple", "shiny"]
OBJECTS = ["ball", "hat", "toy car", "teddy bear", "book", "kite", "box", "drum", "doll", "boat"]
SPOTS = [
    "under the bench",
    "behind a big tree",
    "under a bush",
    "near the fence",
    "in the tall grass",
    "next to a big rock",
    "under a pile of leaves",
    "behind the flowers",
]
DISTRACTIONS = ["look at a butterfly", "pick a flower", "drink some water", "watch the birds", "chase a bee"]
FOODS = ["apple", "cake", "cookie", "pie", "banana", "orange", "sandwich", "muffin"]
INDOOR = [
    ("draw pictures", "drew pictures"),
    ("read a book", "read a book"),
    ("bake cookies", "baked cookies"),
    ("build a fort", "built a fort"),
    ("play a game", "played a game"),
    ("sing songs", "sang songs"),
]
SIGHTS = [
    "a big rainbow",
    "many puddles",
    "a little frog",
    "a wet puppy",
    "a bright sun",
    "a snail on a leaf",
]
CHALLENGES = [
    ("climb the big tree", "climbed the big tree"),
    ("ride a bike", "rode the bike all by {himself}"),
    ("swim across the pond", "swam across the pond"),
    ("build a tall tower of blocks", "built a tall tower"),
    ("fly a kite", "flew the kite high in the sky"),
    ("jump over the big rock", "jumped over the big rock"),
]
NOISES = [
    ("a little cat", "a little cat looking for milk"),
    ("the wind", "the wind shaking the trees"),
    ("an owl", "a big owl sitting on a branch"),
    ("a dog", "a dog playing with a stick"),
    ("the rain", "the rain falling on the roof"),
]
TREASURES = ["a box of old toys", "a map", "a bag of shiny stones", "a tiny key", "a nest with three eggs"]
CAUSAL = [
    "The sun was shining, so {A} wanted to play outside.",
    "It was a cold day, so {A} wore {his} warm hat.",
    "{A} was very tired, so {he} took a short nap.",
    "Because it was windy, the leaves danced in the air.",
    "{A} had eaten a big breakfast, so {he} was full of energy.",
    "The birds were singing, because it was spring.",
]


class _Pick:
    """Choices driven only by ``Random.random()`` (stable across Python versions)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def __call__(self, items):
        return items[int(self._rng.random() * len(items))]

    def chance(self, p: float) -> bool:
        return self._rng.random() < p

    def distinct(self, items, k: int):
        pool = list(items)
        return [pool.pop(int(self._rng.random() * len(pool))) for _ in range(k)]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pronouns(he: str) -> dict[str, str]:
    if he == "he":
        words = {"he": "he", "him": "him", "his": "his", "himself": "himself"}
    else:
        words = {"he": "she", "him": "her", "his": "her", "himself": "herself"}
    return words | {"He": words["he"].capitalize(), "His": words["his"].capitalize()}


def _lost_item(p: _Pick) -> list[str]:
    obj, color = p(OBJECTS), p(COLORS)
    place = p(PLACES)[1]
    s1, s2, s3 = p.distinct(SPOTS, 3)
    return [
        f"One day, {{A}} was playing with {{his}} {color} {obj} {place}.",
        f"{{He}} put the {obj} down to {p(DISTRACTIONS)}. When {{he}} came back, the {obj} was gone!",
        "{A} felt sad and started to cry. Then {B}, {his} friend, came by.",
        '"Why are you sad?" asked {B}.',
        f'"I lost my {obj}," said {{A}}.',
        '"I will help you," said {B}.',
        f"They looked {s1} and {s2}. At last, {{B}} found the {obj} {s3}.",
        '{A} was so happy. "Thank you, {B}!" said {A}.',
        "From that day on, {A} and {B} were best friends.",
    ]


def _rain(p: _Pick) -> list[str]:
    place, _ = p(PLACES)
    act, act_past = p(INDOOR)
    parent = p(["mom", "dad"])
    return [
        f"One morning, {{A}} wanted to go to {place}. But when {{he}} looked outside, it was raining.",
        "{A} was sad because {he} could not go outside.",
        f'{{His}} {parent} said, "Let\'s {act} together."',
        f"So {{A}} and {{his}} {parent} {act_past} all morning.",
        f"When the rain stopped, the sun came out. {{A}} ran to {place} and saw {p(SIGHTS)}.",
        "It was a very good day.",
    ]


def _sharing(p: _Pick) -> list[str]:
    obj, color = p(OBJECTS), p(COLORS)
    return [
        f"{{A}} had a new {color} {obj}. {{He}} loved it very much.",
        f"One day, {{B}} came to play. {{B}} wanted to play with the {obj} too.",
        "At first, {A} did not want to share. {B} felt sad and sat down.",
        f'Then {{A}} thought about it. {{He}} gave the {obj} to {{B}} and said, "We can play together."',
        f"{{B}} smiled. They played with the {obj} all day.",
        "{A} learned that sharing makes everyone happy.",
    ]


def _trying(p: _Pick) -> list[str]:
    goal, done = p(CHALLENGES)
    return [
        f"{{A}} wanted to {goal}. {{He}} tried, but it was too hard and {{he}} fell down.",
        "{A} did not give up. {He} tried again and again.",
        '{B} watched and said, "You can do it, {A}!"',
        f"Finally, {{A}} {done}. {{He}} felt very proud.",
        "{A} learned that if you keep trying, you can do hard things.",
    ]


def _food(p: _Pick) -> list[str]:
    food = p(FOODS)
    return [
        "{A} was very hungry. {He} went to the kitchen to find something to eat.",
        f"{{He}} found {_a(food)} on the table. But the {food} was for {{B}}!",
        "{A} did not eat it. {He} waited for {B} to come home.",
        f"When {{B}} came home, {{B}} was happy to see the {food}.",
        f"{{B}} cut the {food} in two and gave half to {{A}}. They ate it together, and it was yummy.",
    ]


def _night(p: _Pick) -> list[str]:
    short, long = p(NOISES)
    parent = p(["mom", "dad"])
    return [
        "One night, {A} heard a loud noise outside. {He} was scared and hid under {his} blanket.",
        '"What is that?" {he} asked.',
        f"{{His}} {parent} came into the room with a light. They looked out the window and saw {long}.",
        f"It was only {short}! {{A}} laughed and was not scared anymore.",
        "Then {he} went back to sleep.",
    ]


def _explore(p: _Pick) -> list[str]:
    place = p(PLACES)
    treasure = p(TREASURES)
    spot = p(SPOTS)
    return [
        f"One day, {{A}} went to {place[0]} with {{B}}.",
        f"{place[1][0].upper() + place[1][1:]}, they saw something {spot}.",
        '"Look!" said {A}. "What is that?"',
        f"They went closer and found {treasure}.",
        f"{{A}} and {{B}} were very excited. They took {treasure} home to show {{his}} family.",
        "It was the best adventure ever.",
    ]


PLOTS = [_lost_item, _rain, _sharing, _trying, _food, _night, _explore]


def generate_story(p: _Pick) -> str:
    """One story: an opening that introduces character A, an optional causal line, then a plot."""
    (a_name, a_kind, a_he), (b_name, _, b_he) = p.distinct(CHARACTERS, 2)
    # Template keys: {A}/{B} are the names, {he}/{His}/... A's pronouns, {Bhe}/... B's.
    names = {"A": a_name, "B": b_name, **_pronouns(a_he), **{"B" + k: v for k, v in _pronouns(b_he).items()}}
    adj = p(ADJECTIVES)
    opening = p(
        [
            f"Once upon a time, there was {_a(adj)} {a_kind} named {{A}}. {{He}} lived {p(HOMES)}.",
            f"There once was {_a(adj)} {a_kind} named {{A}}. {{He}} lived {p(HOMES)}.",
            f"{{A}} was {_a(adj)} {a_kind} who lived {p(HOMES)}.",
        ]
    )
    sentences = [opening]
    if p.chance(0.4):
        sentences.append(p(CAUSAL))
    sentences += p(PLOTS)(p)
    return " ".join(s.format(**names) for s in sentences)


def generate_stories(num_stories: int = DEFAULT_NUM_STORIES, seed: int = DEFAULT_SEED) -> list[str]:
    """``num_stories`` stories, identical for identical arguments."""
    pick = _Pick(seed)
    return [generate_story(pick) for _ in range(num_stories)]


def write_corpus(
    path: str | os.PathLike, num_stories: int = DEFAULT_NUM_STORIES, seed: int = DEFAULT_SEED
) -> Path:
    """Write the stories as JSON lines ``{"text": ...}`` (ASCII, ``\\n`` line ends: stable bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for text in generate_stories(num_stories, seed):
            f.write(json.dumps({"text": text}, ensure_ascii=True) + "\n")
    return path


def build_default_assets(out_dir: str | os.PathLike | None = None) -> Path:
    """Regenerate ``tiny_stories.jsonl`` and the ``tokenizer/`` trained on it (default: into the package).

    Run ``python -c "from loongforge.data.synthetic_corpus import build_default_assets as b; b()"``
    after changing the generator, and commit the result.
    """
    from loongforge.data.tokenizer import train_bpe_tokenizer

    out = Path(out_dir) if out_dir is not None else Path(str(resources.files("loongforge.assets")))
    corpus = write_corpus(out / CORPUS_FILE)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    train_bpe_tokenizer(texts, DEFAULT_VOCAB_SIZE, out / TOKENIZER_DIR)
    return out


def _asset(name: str) -> Path:
    # Installed wheels and editable installs keep package data as plain files; no zip support needed.
    path = Path(str(resources.files("loongforge.assets").joinpath(name)))
    if not path.exists():
        raise DataError(f"shipped asset missing: {path} (rebuild with build_default_assets())")
    return path


def builtin_corpus_path(name: str = "tiny_stories") -> Path:
    """Path of a corpus shipped with the package (``builtin:tiny_stories`` in configs)."""
    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown builtin corpus {name!r}; available: {sorted(BUILTIN_CORPORA)}")
    return _asset(BUILTIN_CORPORA[name])


def builtin_tokenizer_dir(name: str = "tiny_stories") -> Path:
    """Directory of the tokenizer shipped with a builtin corpus."""
    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown builtin tokenizer {name!r}; available: {sorted(BUILTIN_CORPORA)}")
    return _asset(TOKENIZER_DIR)
