"""A small seeded probabilistic grammar of English-like text on five topics, for the offline demo.

Each document is about one topic (weather, cooking, sports, trade or astronomy, drawn with unequal
probabilities so some experts are used more than others) and is in one tense throughout. Sentences
are built from shared templates and shared function words, filled with the topic's own nouns,
verbs, adjectives and places, with number agreement between subject, determiner and verb. So a
model must track the topic and the tense over the document, and its experts have something real to
specialise in: every content word belongs to exactly one topic.

The text is lower case, words and punctuation separated by spaces, documents separated by a blank
line; `word_tokenizer()` maps it to one token per word (the blank line becomes `</s>`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

# ---- the word lists --------------------------------------------------------------------------------
# Nouns are "singular/plural" (plural "+s" when not given); verbs "base/past" (past "+ed" when not
# given; the third person singular is derived by rule).


@dataclass(frozen=True)
class Topic:
    """The content words of one topic; no word appears in two topics or among the function words."""

    name: str
    weight: float  # relative share of documents
    nouns: tuple[str, ...]
    places: tuple[str, ...]  # nouns after a preposition: "in the kitchen"
    verbs: tuple[str, ...]  # transitive: subject verb object
    intransitive: tuple[str, ...]
    adjectives: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        "weather", 0.30,
        nouns=("storm", "cloud", "wind", "rain", "fog", "thunder", "breeze", "frost", "flood",
               "forecast", "drought", "hailstone", "rainbow", "gust"),
        places=("valley", "coast", "hill", "north", "plain", "mountain"),
        verbs=("soak", "cover/covered", "chill", "flatten", "batter", "drench", "freeze/froze", "warm",
               "darken"),
        intransitive=("blow/blew", "pour", "clear", "thunder", "drizzle", "fade"),
        adjectives=("humid", "stormy", "cloudy", "windy", "chilly", "foggy", "damp", "icy", "mild"),
    ),
    Topic(
        "cooking", 0.25,
        nouns=("chef", "soup", "onion", "garlic", "pan", "oven", "sauce", "recipe", "dough", "knife/knives",
               "spoon", "pepper", "stew", "butter"),
        places=("kitchen", "restaurant", "bakery", "pantry", "stove", "cellar"),
        verbs=("chop/chopped", "stir/stirred", "bake", "season", "roast", "slice", "simmer", "fry/fried",
               "taste"),
        intransitive=("boil", "sizzle", "burn/burnt", "rise/rose", "cool", "thicken"),
        adjectives=("spicy", "salty", "crispy", "tender", "sweet", "savory", "bitter", "creamy", "fresh"),
    ),
    Topic(
        "sports", 0.20,
        nouns=("team", "coach", "striker", "referee", "goal", "ball", "match", "league", "trophy",
               "captain", "keeper", "fan", "tournament", "whistle"),
        places=("stadium", "pitch", "arena", "court", "field", "locker"),
        verbs=("defeat", "tackle", "pass", "score", "kick", "coach/coached", "train", "cheer", "block"),
        intransitive=("win/won", "lose/lost", "sprint", "celebrate", "stumble", "tie/tied"),
        adjectives=("fast", "fit", "skilled", "tired", "loyal", "fierce", "agile", "brave", "unbeaten"),
    ),
    Topic(
        "trade", 0.15,
        nouns=("merchant", "market", "price", "cargo", "ship", "buyer", "coin", "tax", "contract",
               "broker", "profit", "crate", "ledger", "tariff"),
        places=("harbor", "bank", "warehouse", "port", "exchange", "bazaar"),
        verbs=("buy/bought", "sell/sold", "ship/shipped", "import", "export", "tax", "owe/owed",
               "insure", "lend/lent"),
        intransitive=("grow/grew", "fall/fell", "prosper", "bargain", "recover", "stall"),
        adjectives=("cheap", "costly", "wealthy", "foreign", "profitable", "scarce", "bulk", "frugal",
                    "shrewd"),
    ),
    Topic(
        "astronomy", 0.10,
        nouns=("star", "planet", "comet", "moon", "telescope", "galaxy", "orbit", "astronomer", "nebula",
               "asteroid", "eclipse", "meteor", "satellite", "quasar"),
        places=("sky", "observatory", "cosmos", "horizon", "void", "zenith"),
        verbs=("observe", "orbit", "eclipse", "photograph", "map/mapped", "measure", "detect", "chart",
               "spot/spotted"),
        intransitive=("shine/shone", "twinkle", "spin/spun", "glow", "collapse", "drift"),
        adjectives=("distant", "bright", "faint", "massive", "lunar", "solar", "cosmic", "dim", "starry"),
    ),
)

DETERMINERS = {"sg": ("the", "a", "this", "every", "one"), "pl": ("the", "some", "these", "many", "two")}
BE = {("sg", "present"): "is", ("pl", "present"): "are", ("sg", "past"): "was", ("pl", "past"): "were"}
INTENSIFIERS = ("very", "quite", "rather", "not")
PREPOSITIONS = ("in", "near", "over", "at", "across", "beyond")
SUBORDINATORS = ("when", "because", "after", "while", "before")
CONJUNCTIONS = ("and", "but", "so")
OPENERS = ("today", "then", "later", "meanwhile", "again", "suddenly")
PUNCTUATION = (".", ",")
THERE = "there"

# ---- inflection ------------------------------------------------------------------------------------


def _pair(entry: str, suffix: str) -> tuple[str, str]:
    base, _, other = entry.partition("/")
    return base, other or _regular(base, suffix)


def _regular(base: str, suffix: str) -> str:
    if suffix == "s":
        if base.endswith(("s", "sh", "ch", "x", "z", "o")):
            return base + "es"
        if base.endswith("y") and base[-2] not in "aeiou":
            return base[:-1] + "ies"
        return base + "s"
    if base.endswith("e"):
        return base + "d"
    if base.endswith("y") and base[-2] not in "aeiou":
        return base[:-1] + "ied"
    return base + "ed"


def noun_forms(entry: str) -> dict[str, str]:
    sg, pl = _pair(entry, "s")
    return {"sg": sg, "pl": pl}


def verb_forms(entry: str) -> dict[tuple[str, str], str]:
    """(number, tense) -> form: 'pl present' is the base, 'sg present' the -s form, past either way."""
    base, past = _pair(entry, "ed")
    return {("pl", "present"): base, ("sg", "present"): _regular(base, "s"), ("sg", "past"): past,
            ("pl", "past"): past}


def topic_words(topic: Topic) -> set[str]:
    """Every word form a topic contributes."""
    words: set[str] = set()
    for entry in topic.nouns + topic.places:
        words.update(noun_forms(entry).values())
    for entry in topic.verbs + topic.intransitive:
        words.update(verb_forms(entry).values())
    words.update(topic.adjectives)
    return words


def function_words() -> set[str]:
    """The words every topic shares."""
    return {*DETERMINERS["sg"], *DETERMINERS["pl"], *BE.values(), *INTENSIFIERS, *PREPOSITIONS,
            *SUBORDINATORS, *CONJUNCTIONS, *OPENERS, *PUNCTUATION, THERE}


def vocabulary() -> list[str]:
    """All words the grammar can emit, sorted (the tokenizer adds four special tokens in front)."""
    words = set(function_words())
    for t in TOPICS:
        words |= topic_words(t)
    return sorted(words)


def fingerprint() -> str:
    """Changes whenever the grammar does (word lists or this generator's version), for cache keys."""
    spec = {"version": 1, "topics": [asdict(t) for t in TOPICS], "function": sorted(function_words())}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# ---- generation ------------------------------------------------------------------------------------


def _zipf(rng: random.Random, items: tuple[str, ...]) -> str:
    """Earlier words are more frequent (weight 1/(rank+1)), as in real text."""
    return rng.choices(items, weights=[1 / (r + 1) for r in range(len(items))])[0]


class _Writer:
    """Writes one document: a topic and a tense fixed for all its sentences."""

    def __init__(self, rng: random.Random, topic: Topic, tense: str):
        self.rng, self.t, self.tense = rng, topic, tense

    def np(self, number: str, adjective: float = 0.4, place: bool = False) -> list[str]:
        r = self.rng
        det = r.choice(DETERMINERS[number]) if not place else "the"
        noun = noun_forms(_zipf(r, self.t.places if place else self.t.nouns))[number]
        adj = [_zipf(r, self.t.adjectives)] if r.random() < adjective else []
        return [det, *adj, noun]

    def pp(self) -> list[str]:
        return [self.rng.choice(PREPOSITIONS), *self.np("sg", 0.2, place=True)]

    def clause(self) -> list[str]:
        r = self.rng
        number = r.choice(("sg", "pl"))
        subject = self.np(number)
        kind = r.random()
        if kind < 0.45:
            verb = verb_forms(_zipf(r, self.t.verbs))[number, self.tense]
            return [*subject, verb, *self.np(r.choice(("sg", "pl")))]
        if kind < 0.75:
            verb = verb_forms(_zipf(r, self.t.intransitive))[number, self.tense]
            return [*subject, verb, *(self.pp() if r.random() < 0.6 else [])]
        if kind < 0.9:
            extra = [r.choice(INTENSIFIERS)] if r.random() < 0.5 else []
            return [*subject, BE[number, self.tense], *extra, _zipf(r, self.t.adjectives)]
        return [THERE, BE[number, self.tense], *self.np(number), *self.pp()]

    def sentence(self) -> list[str]:
        r = self.rng
        kind = r.random()
        opener = [r.choice(OPENERS), ","] if r.random() < 0.15 else []
        if kind < 0.6:
            body = self.clause()
        elif kind < 0.8:
            body = [r.choice(SUBORDINATORS), *self.clause(), ",", *self.clause()]
        else:
            body = [*self.clause(), r.choice(CONJUNCTIONS), *self.clause()]
        return [*opener, *body, "."]


@dataclass(frozen=True)
class Document:
    topic: str
    tense: str
    text: str

    @property
    def words(self) -> list[str]:
        return self.text.split()


def documents(n: int, seed: int) -> list[Document]:
    """`n` documents of 3–8 sentences; the same seed gives the same documents."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choices(TOPICS, weights=[t.weight for t in TOPICS])[0]
        tense = rng.choice(("present", "past"))
        w = _Writer(rng, topic, tense)
        words = [x for _ in range(rng.randint(3, 8)) for x in w.sentence()]
        out.append(Document(topic.name, tense, " ".join(words)))
    return out


def corpus(words: int, seed: int) -> str:
    """Documents separated by blank lines until at least `words` words; ends with a blank line."""
    rng = random.Random(seed)
    parts, total = [], 0
    while total < words:
        batch = documents(64, rng.randrange(2**31))
        for d in batch:
            parts.append(d.text)
            total += len(d.words) + 1  # + the end-of-document token
            if total >= words:
                break
    return "\n\n".join(parts) + "\n\n"


# ---- tokenizer -------------------------------------------------------------------------------------
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def word_tokenizer():
    """One token per grammar word (unknown words become `<unk>`), a blank line becomes `</s>`.

    A `PreTrainedTokenizerFast`, so it saves with `save_pretrained` next to the model and loads
    with `AutoTokenizer`, offline.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("\n\n", " </s> "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
