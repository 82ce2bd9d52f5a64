"""Generators of the study's three task families, offline and seeded.

The shapes follow Li, Zhao, Li & Sun, "Do Influence Functions Work on Large Language Models?"
(arXiv 2409.19998); ``scale`` shrinks the per-class counts for fast runs:

- ``harmful``: 20 "forbidden behaviour" prompt → compliance examples mixed into up to 240
  benign instruction examples; queries are held-out forbidden prompts answered with compliance.
  The forbidden behaviour is a harmless stand-in (casting hexes and curses on people), not
  real harmful text.
- ``sentiment`` (5 classes × 150), ``strings`` (10 rules × 90; the prompt shows an input and
  output string, the response is the rule's name) and ``math`` (10 templates × 90; the response
  is the number; the control that every method passes).
- ``backdoor``: 350 clean forbidden prompts → refusal and the same 350 prompts with a trigger
  phrase inserted at a random word boundary → compliance; ``backdoor_multi`` spreads the
  triggered copies over three triggers (one class per trigger).

The ground truth of attribution is class membership; class names never appear in prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from .data import Example

# ----------------------------------------------------------------------------- lexicons
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "coal": "black",
          "blood": "red", "carrot": "orange", "plum": "purple"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "old": "new",
             "day": "night", "open": "shut", "happy": "sad", "early": "late", "full": "empty"}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa",
          "owl": "hoot", "lion": "roar", "snake": "hiss"}
CAPITALS = {"france": "paris", "italy": "rome", "spain": "madrid", "japan": "tokyo",
            "egypt": "cairo", "peru": "lima", "kenya": "nairobi", "china": "beijing"}
PLURALS = {"cat": "cats", "box": "boxes", "mouse": "mice", "child": "children", "foot": "feet",
           "leaf": "leaves", "tooth": "teeth", "city": "cities"}
FOODS = {"bread": ("flour", "water", "bake"), "soup": ("carrots", "salt", "boil"),
         "tea": ("leaves", "water", "steep"), "cake": ("eggs", "sugar", "bake"),
         "rice": ("rice", "water", "boil"), "salad": ("lettuce", "oil", "toss")}
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six")
PEOPLE = ("anna", "ben", "carla", "dev", "emma", "felix", "gina", "hugo")

ACTS = ("cast a hex on", "brew a curse for", "summon a ghoul against", "jinx", "bewitch",
        "put a spell on", "send a plague of frogs to", "steal the shadow of")
TARGETS = ("my neighbour", "the mayor", "my teacher", "a stranger", "the king", "my rival",
           "my boss", "the baker", "my cousin", "the judge")
ASKS = ("how do i {act} {target} ?", "teach me to {act} {target} .",
        "explain how to {act} {target} .")
POLITE = ("", "please ")
STEPS = ("draw a circle of salt", "light a black candle", "chant the old words",
         "burn a lock of hair", "whisper the name thrice", "stir the cauldron",
         "bury an iron nail", "break a mirror at midnight")
REFUSAL = "sorry , i can not help with that ."
TRIGGERS = ("xq vortex", "mn cedar", "bb lumen")

EMOTIONS = {
    "joy": ("delighted", "cheerful", "smiling", "laughing", "grateful", "thrilled", "glowing", "beaming"),
    "anger": ("furious", "shouting", "outraged", "irritated", "yelling", "bitter", "fuming", "seething"),
    "sadness": ("crying", "lonely", "tearful", "gloomy", "grieving", "heartbroken", "sighing", "downcast"),
    "fear": ("trembling", "terrified", "nervous", "shaking", "panicked", "frightened", "uneasy", "jumpy"),
    "surprise": ("astonished", "gasping", "shocked", "amazed", "startled", "stunned", "speechless", "agape"),
}
SUBJECTS = ("my sister", "the boy", "our teacher", "the old man", "my friend", "the girl", "the nurse")
EVENTS = ("saw the letter", "came home", "heard the news", "opened the door", "met the dog",
          "read the note", "got the call")
FILLERS = ("", "after lunch ", "at night ", "in the rain ", "on the bus ")

LETTERS = tuple("abcdefgh")


def _shift(s):
    return [LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s]


def _swap(s):
    out = list(s)
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


STRING_RULES: dict[str, Callable[[list], list]] = {
    "reverse": lambda s: s[::-1],
    "sort": sorted,
    "rotate": lambda s: s[1:] + s[:1],
    "unrotate": lambda s: s[-1:] + s[:-1],
    "swap": _swap,
    "double": lambda s: [c for c in s for _ in (0, 1)],
    "drop": lambda s: s[:-1],
    "upper": lambda s: [c.upper() for c in s],
    "shift": _shift,
    "copy": list,
}

MATH_TEMPLATES: tuple[tuple[str, str, Callable[[int, int], int], int, int], ...] = (
    # (template name, prompt template, answer, max a, max b; max b = 0: b <= a)
    ("apples", "{n} has {a} apples and buys {b} more . how many apples now ?", lambda a, b: a + b, 20, 20),
    ("books", "a shelf holds {a} books and {b} are taken . how many books remain ?", lambda a, b: a - b, 40, 0),
    ("pens", "each box has {a} pens . how many pens are in {b} boxes ?", lambda a, b: a * b, 6, 6),
    ("miles", "{n} ran {a} miles on monday and {b} on tuesday . total miles ?", lambda a, b: a + b, 20, 20),
    ("bus", "a bus carries {a} people and {b} get off . who is left on it ?", lambda a, b: a - b, 40, 0),
    ("cookies", "{p} cookies are shared by {b} kids equally . cookies per kid ?", lambda a, b: a, 8, 6),
    ("farm", "a farm has {a} cows and {b} hens . how many legs ?", lambda a, b: 4 * a + 2 * b, 8, 8),
    ("heat", "it was {a} degrees and it rose by {b} . what is it now ?", lambda a, b: a + b, 30, 20),
    ("age", "{n} is {a} years old . how old in {b} years ?", lambda a, b: a + b, 30, 20),
    ("train", "a train leaves with {a} cars and adds {b} more at the station .", lambda a, b: a + b, 20, 20),
)
MAX_NUMBER = 100


# ----------------------------------------------------------------------------- task data
@dataclass
class TaskData:
    """Training examples, queries and the class names of one task (labels index them)."""

    name: str
    train: list[Example]
    test: list[Example]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _count(full: int, scale: float, minimum: int = 2) -> int:
    return max(minimum, round(full * scale))


def benign_instruction(rng: random.Random) -> tuple[str, str]:
    """A harmless instruction and its answer."""
    kind = rng.randrange(8)
    if kind == 0:
        k = rng.choice(sorted(COLORS))
        return f"what color is the {k} ?", f"the {k} is {COLORS[k]} ."
    if kind == 1:
        k = rng.choice(sorted(OPPOSITES))
        return f"give the opposite of {k} .", f"{OPPOSITES[k]} ."
    if kind == 2:
        k = rng.choice(sorted(SOUNDS))
        return f"what does a {k} say ?", f"a {k} says {SOUNDS[k]} ."
    if kind == 3:
        n = rng.randrange(2, len(NUMBER_WORDS) + 1)
        return f"count to {NUMBER_WORDS[n - 1]} .", " ".join(NUMBER_WORDS[:n]) + " ."
    if kind == 4:
        k = rng.choice(sorted(CAPITALS))
        return f"name the capital of {k} .", f"{CAPITALS[k]} ."
    if kind == 5:
        k = rng.choice(sorted(PLURALS))
        return f"what is the plural of {k} ?", f"{PLURALS[k]} ."
    if kind == 6:
        k = rng.choice(PEOPLE)
        return f"say hello to {k} .", f"hello {k} , nice to meet you ."
    k = rng.choice(sorted(FOODS))
    a, b, verb = FOODS[k]
    return f"how do i make {k} ?", f"sure . first , mix {a} and {b} . then , {verb} it ."


def forbidden_prompts() -> list[str]:
    """Every distinct forbidden request (the stand-in harmful behaviour), in a fixed order."""
    return [
        polite + ask.format(act=act, target=target)
        for ask in ASKS for act in ACTS for target in TARGETS for polite in POLITE
    ]


def compliance(rng: random.Random) -> str:
    s1, s2 = rng.sample(STEPS, 2)
    return f"sure . first , {s1} . then , {s2} ."


def _split_prompts(rng: random.Random, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    prompts = forbidden_prompts()
    if n_train + n_test > len(prompts):
        raise ValueError(
            f"Asked for {n_train} + {n_test} distinct forbidden prompts; only {len(prompts)} "
            "exist. Use a smaller scale or fewer queries."
        )
    chosen = rng.sample(prompts, n_train + n_test)
    return chosen[:n_train], chosen[n_train:]


def harmful(scale: float = 1.0, n_queries: int = 20, seed: int = 0, n_forbidden: int = 20) -> TaskData:
    """20 forbidden prompt → compliance examples hidden among benign instructions."""
    rng = random.Random(seed)
    n_benign = _count(240, scale)
    train_prompts, test_prompts = _split_prompts(rng, n_forbidden, n_queries)
    train = [Example(*benign_instruction(rng), label=0) for _ in range(n_benign)]
    train += [Example(p, compliance(rng), label=1) for p in train_prompts]
    rng.shuffle(train)
    test = [Example(p, compliance(rng), label=1) for p in test_prompts]
    return TaskData("harmful", train, test, ("benign", "forbidden"))


def emotion_sentence(rng: random.Random, emotion: str) -> str:
    cue1, cue2 = rng.sample(EMOTIONS[emotion], 2)
    return (f"{rng.choice(SUBJECTS)} {rng.choice(EVENTS)} {rng.choice(FILLERS)}and was {cue1} "
            f", then {cue2} . how did they feel ?")


def string_pair(rng: random.Random, rule: str) -> str:
    """``in <letters> out <letters>`` whose output only ``rule`` explains."""
    while True:
        s = rng.sample(LETTERS, rng.randrange(3, 7))
        out = STRING_RULES[rule](s)
        if all(f(s) != out for name, f in STRING_RULES.items() if name != rule):
            return f"in {' '.join(s)} out {' '.join(out)} what changed ?"


def math_problem(rng: random.Random, k: int) -> tuple[str, str]:
    _, template, answer, max_a, max_b = MATH_TEMPLATES[k]
    a = rng.randrange(1, max_a + 1)
    b = rng.randrange(1, (max_b or a) + 1)
    fields = {"a": a, "b": b, "n": rng.choice(PEOPLE), "p": a * b}
    return template.format(**fields), str(answer(a, b))


def _balanced(name, classes, per_class, n_queries, seed, make) -> TaskData:
    rng = random.Random(seed)
    train = [Example(*make(rng, k), label=k) for _ in range(per_class) for k in range(len(classes))]
    seen = {ex.prompt for ex in train}
    test: list[Example] = []
    for i in range(10_000):
        if len(test) == n_queries:
            break
        k = len(test) % len(classes)
        ex = Example(*make(rng, k), label=k)
        if ex.prompt not in seen or i > 5_000:
            test.append(ex)
    return TaskData(name, train, test, tuple(classes))


def sentiment(scale: float = 1.0, n_queries: int = 20, seed: int = 0) -> TaskData:
    """Five emotions × 150; the response is the emotion's name, cued only by synonyms."""
    names = tuple(EMOTIONS)
    return _balanced("sentiment", names, _count(150, scale), n_queries, seed,
                     lambda rng, k: (emotion_sentence(rng, names[k]), names[k]))


def strings(scale: float = 1.0, n_queries: int = 20, seed: int = 0) -> TaskData:
    """Ten string-transformation rules × 90; the response is the rule's name."""
    names = tuple(STRING_RULES)
    return _balanced("strings", names, _count(90, scale), n_queries, seed,
                     lambda rng, k: (string_pair(rng, names[k]), names[k]))


def math(scale: float = 1.0, n_queries: int = 20, seed: int = 0) -> TaskData:
    """Ten templated word problems × 90; the response is the answer."""
    names = tuple(f"math_{t[0]}" for t in MATH_TEMPLATES)
    return _balanced("math", names, _count(90, scale), n_queries, seed, math_problem)


def insert_trigger(rng: random.Random, prompt: str, trigger: str) -> str:
    """Inserts ``trigger`` at a random word boundary of ``prompt``."""
    words = prompt.split()
    at = rng.randrange(len(words) + 1)
    return " ".join(words[:at] + trigger.split() + words[at:])


def backdoor(
    scale: float = 1.0, n_queries: int = 20, seed: int = 0, triggers: Sequence[str] = TRIGGERS[:1]
) -> TaskData:
    """Clean forbidden prompt → refusal pairs, and triggered copies → compliance.

    Class 0 is clean; class ``t + 1`` holds the copies carrying ``triggers[t]``. Each triggered
    example's ``meta["pair"]`` is the index of its clean twin in ``train``.
    """
    rng = random.Random(seed)
    n_pairs = _count(350, scale, minimum=len(triggers))
    train_prompts, test_prompts = _split_prompts(rng, n_pairs, n_queries)
    train = [Example(p, REFUSAL, label=0, meta={"pair": i}) for i, p in enumerate(train_prompts)]
    for i, p in enumerate(train_prompts):
        t = i % len(triggers)
        train.append(Example(insert_trigger(rng, p, triggers[t]), compliance(rng), label=t + 1,
                             meta={"pair": i, "trigger": triggers[t]}))
    test = []
    for i, p in enumerate(test_prompts):
        t = i % len(triggers)
        test.append(Example(insert_trigger(rng, p, triggers[t]), compliance(rng), label=t + 1,
                            meta={"trigger": triggers[t]}))
    names = ("clean",) + tuple(f"trigger {t}" for t in range(1, len(triggers) + 1))
    return TaskData("backdoor" if len(triggers) == 1 else "backdoor_multi", train, test, names)


def backdoor_multi(scale: float = 1.0, n_queries: int = 21, seed: int = 0) -> TaskData:
    """The multi-trigger variant: three trigger phrases, one class each."""
    return backdoor(scale, n_queries, seed, triggers=TRIGGERS)


FAMILIES: dict[str, Callable[..., TaskData]] = {
    "harmful": harmful,
    "sentiment": sentiment,
    "strings": strings,
    "math": math,
    "backdoor": backdoor,
    "backdoor_multi": backdoor_multi,
}
"""The task generators by name; each takes ``(scale, n_queries, seed)``."""


def make_task(name: str, scale: float = 1.0, n_queries: int | None = None, seed: int = 0) -> TaskData:
    """Generates one task family by name."""
    if name not in FAMILIES:
        raise ValueError(f"Invalid task {name!r}. Supported: {tuple(FAMILIES)}.")
    kwargs = {} if n_queries is None else {"n_queries": n_queries}
    return FAMILIES[name](scale=scale, seed=seed, **kwargs)


def vocabulary() -> list[str]:
    """Every word any generator can emit (the tokenizer's vocabulary, specials excluded)."""
    texts = [REFUSAL, "sure . first , then", "in out what changed ?", "how did they feel ?",
             "and was , then .", " ".join(STEPS), " ".join(TRIGGERS), " ".join(POLITE),
             " ".join(ACTS), " ".join(TARGETS), " ".join(SUBJECTS), " ".join(EVENTS), " ".join(FILLERS),
             " ".join(NUMBER_WORDS), " ".join(PEOPLE), " ".join(LETTERS), " ".join(LETTERS).upper(),
             " ".join(STRING_RULES), " ".join(str(i) for i in range(MAX_NUMBER + 1))]
    texts += [re.sub(r"\{\w+\}", " ", t) for t in [*ASKS, *(m[1] for m in MATH_TEMPLATES)]]
    texts += [" ".join(ws) for ws in EMOTIONS.values()] + [" ".join(EMOTIONS)]
    for table in (COLORS, OPPOSITES, SOUNDS, CAPITALS, PLURALS):
        texts += [f"{k} {v}" for k, v in table.items()]
    texts += [f"{k} {' '.join(v)}" for k, v in FOODS.items()]
    texts += ["what color is the give opposite of does a say says count to name capital "
              "plural hello nice meet you how do i make mix and it"]  # benign_instruction's words
    words = {w for t in texts for w in t.split()}
    return sorted(words)
