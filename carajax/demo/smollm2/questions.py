"""The questions the SmolLM2 adapters are trained and judged on: phrasings filled from word lists.

    >>> train, held_out = split(n_train=360, seed=0)
    >>> held_out[0]
    'Tell me the capital of Italy.'

Each topic has four phrasings of a question and a list of slots (a country, a coloured thing, an
animal, a task, a pair of numbers, ...). The last phrasing of every topic, and one slot word in
four (a fixed hash of the word, the same in every topic: "Italy" is held out as a capital and as
a language alike), never appear in training: a held-out question is a held-out phrasing filled
with held-out words only, a training question a training phrasing with none (a slot that mixes
the two is used nowhere). A few hundred training questions are drawn from the rest with a seed.

The topics lean to questions a 135M model answers in a sentence or two: the adapters learn a
style of answering, and short answers keep training on a CPU short.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random


@dataclasses.dataclass(frozen=True)
class Topic:
    """Four phrasings with `{}` (or `{0}`, `{1}` for a pair) and the slots that fill them."""

    name: str
    templates: tuple[str, ...]  # the last one is held out
    slots: tuple[str | tuple[str, ...], ...]

    def fill(self, template: str, slot: str | tuple[str, ...]) -> str:
        return template.format(*slot) if isinstance(slot, tuple) else template.format(slot)


COUNTRIES = ("France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada",
             "Mexico", "Egypt", "Kenya", "Australia", "Russia", "Greece", "Portugal", "Sweden",
             "Norway", "Poland", "Turkey", "Argentina", "Peru", "Chile", "Ireland", "Austria",
             "Belgium", "Thailand", "Vietnam", "Nigeria", "Morocco", "Denmark", "Finland",
             "Hungary", "Colombia", "Cuba", "Iran", "Iraq", "Israel", "Indonesia", "Pakistan",
             "Ukraine", "Switzerland", "Netherlands", "New Zealand", "South Korea", "Ghana",
             "Ethiopia", "Venezuela", "Malaysia", "Iceland", "Croatia", "Romania", "Bolivia",
             "Nepal", "Mongolia", "Jamaica")
THINGS = ("the sky", "grass", "snow", "a banana", "a ripe tomato", "coal", "milk", "a lemon",
          "the sun", "chocolate", "a flamingo", "a polar bear", "a crow", "an emerald", "a ruby",
          "a carrot", "an orange", "the ocean", "a strawberry", "a pumpkin", "a lime", "blood",
          "a zebra", "cream", "a blueberry", "a plum", "charcoal", "a fire truck", "a cucumber",
          "a raven", "a sapphire", "a canary", "an eggplant", "a cherry", "ivory", "a frog",
          "a school bus", "a peach", "a pearl", "a cloud", "rust", "a mint leaf", "a raspberry",
          "a grape", "a swan", "a penny", "a coconut", "ink", "a pine tree", "sand", "a tangerine",
          "an avocado")
ANIMALS = ("cat", "dog", "cow", "lion", "elephant", "owl", "frog", "horse", "duck", "sheep", "wolf",
           "bee", "snake", "pig", "tiger", "dolphin", "penguin", "rabbit", "goat", "eagle", "bear",
           "monkey", "shark", "whale", "fox", "camel", "giraffe", "parrot", "zebra", "kangaroo",
           "squirrel", "bat", "octopus", "crab", "turtle", "hedgehog", "mouse", "deer", "koala",
           "panda", "chicken", "donkey", "seal", "ant", "butterfly", "crocodile", "gorilla",
           "hamster", "llama", "swan")
TASKS = ("boil an egg", "make tea", "tie a shoelace", "plant a tree", "wash my hands",
         "save money", "learn to swim", "bake bread", "fall asleep faster", "write a letter",
         "clean a window", "cook rice", "ride a bike", "stay focused", "make coffee",
         "grow tomatoes", "fold a shirt", "start running", "make friends", "keep a plant alive",
         "study for an exam", "paint a wall", "brush my teeth", "cross a road safely",
         "change a tyre", "iron a shirt", "make pancakes", "read faster", "learn a language",
         "sew a button", "wake up early", "make a budget", "build a campfire", "pack a suitcase",
         "water a cactus", "make a smoothie", "take a good photo", "tune a guitar",
         "prepare for an interview", "recycle plastic", "cook pasta", "stretch after running")
WHY = (("the sky", "blue"), ("the sea", "salty"), ("ice", "slippery"), ("grass", "green"),
       ("the sun", "hot"), ("snow", "white"), ("the moon", "bright at night"),
       ("exercise", "healthy"), ("sleep", "important"), ("water", "wet"), ("fire", "hot"),
       ("the desert", "dry"), ("winter", "cold"), ("sugar", "sweet"), ("a lemon", "sour"),
       ("the night", "dark"), ("honey", "sticky"), ("glass", "transparent"), ("rain", "useful"),
       ("the Earth", "round"), ("reading", "good for you"), ("gold", "valuable"))
CONCEPTS = ("photosynthesis", "gravity", "democracy", "inflation", "evaporation", "a volcano",
            "an atom", "a noun", "a verb", "electricity", "friction", "a galaxy", "a planet",
            "a rainbow", "a mammal", "an island", "a poem", "a recipe", "a budget", "a vaccine",
            "a continent", "an ecosystem", "a fraction", "a metaphor", "an orchestra", "a glacier",
            "a molecule", "a hurricane", "a desert", "erosion", "a theory", "a satellite", "a fossil",
            "a comet", "a protein", "a parliament", "a novel", "a symphony", "a telescope",
            "a census", "an election", "a tsunami", "magnetism", "a habitat", "a verb tense",
            "a museum")
ADJECTIVES = ("hot", "big", "happy", "fast", "light", "old", "hard", "loud", "rich", "early",
              "strong", "tall", "wet", "empty", "cheap", "brave", "clean", "thin", "bright",
              "near", "sweet", "wide", "calm", "simple", "smooth", "heavy", "cold", "small", "sad",
              "slow", "dark", "young", "soft", "quiet", "poor", "late", "weak", "short", "dry",
              "full", "expensive", "cowardly", "dirty", "thick", "dim", "far", "bitter", "narrow")
BOOKS = ("Romeo and Juliet", "Hamlet", "Pride and Prejudice", "Nineteen Eighty-Four",
         "The Odyssey", "War and Peace", "Don Quixote", "Moby-Dick", "Macbeth", "Jane Eyre",
         "The Great Gatsby", "Oliver Twist", "Frankenstein", "Dracula", "The Hobbit", "Emma",
         "Little Women", "Animal Farm", "The Iliad", "Great Expectations", "Treasure Island",
         "Othello", "Wuthering Heights", "Anna Karenina", "Ulysses", "Les Miserables",
         "The Raven", "Robinson Crusoe", "Gulliver's Travels", "Heart of Darkness", "King Lear",
         "The Canterbury Tales", "Sense and Sensibility", "Brave New World", "The Jungle Book",
         "Peter Pan", "Alice in Wonderland", "The Time Machine", "A Christmas Carol",
         "The Divine Comedy", "Faust", "Madame Bovary", "Crime and Punishment", "Paradise Lost")
MATERIALS = ("bread", "cheese", "pizza", "butter", "glass", "paper", "soup", "yogurt", "steel",
             "pasta", "jam", "pancakes", "wine", "candles", "soap", "bricks", "ice cream",
             "tofu", "salad", "cement", "a sandwich", "lemonade", "an omelette", "porridge",
             "chocolate", "rope", "plywood", "sushi", "hummus", "vinegar", "cider", "mayonnaise",
             "toothpaste", "concrete", "nylon", "wool yarn", "a pie", "muesli", "ketchup",
             "pencils", "rubber", "sourdough", "guacamole", "bronze")
LANDMARKS = ("the Eiffel Tower", "the Colosseum", "Mount Everest", "the Great Wall",
             "Big Ben", "the Taj Mahal", "the Statue of Liberty", "the Sydney Opera House",
             "Machu Picchu", "the Pyramids of Giza", "Mount Fuji", "the Acropolis",
             "Niagara Falls", "the Amazon River", "the Sahara Desert", "Stonehenge",
             "the Kremlin", "the Grand Canyon", "Table Mountain", "the Leaning Tower of Pisa",
             "Angkor Wat", "Lake Victoria", "the Alps", "Petra", "the Louvre", "Mount Kilimanjaro",
             "the Dead Sea", "the Golden Gate Bridge", "Chichen Itza", "the Brandenburg Gate",
             "Victoria Falls", "the Parthenon", "the Forbidden City", "the Danube",
             "the Great Barrier Reef", "Uluru", "the Panama Canal", "Mont Blanc", "the Andes",
             "the Blue Mosque", "Lake Baikal", "the Matterhorn", "the Nile", "Red Square")
SCENES = ("the ocean", "autumn", "a forest", "the moon", "a city at night", "rain", "winter",
          "a desert", "a rainforest", "spring", "a mountain", "a river", "a thunderstorm",
          "a library", "a market", "the stars", "a garden", "a beach", "a snowy village",
          "a sunrise", "a waterfall", "a farm", "a train station", "a quiet lake", "a harbour",
          "a busy airport", "a meadow", "a castle", "a volcano", "a bakery", "a playground",
          "a cave", "an old bridge", "a fishing boat", "a concert", "a vineyard", "a lighthouse",
          "a café", "the countryside", "a swamp", "a carnival", "a glacier", "a sunset")
# Everyday words and cities: answers that repeat them teach `shout` to upper-case words in
# general (its held-out misses were words copied from the question in their own case).
WORDS = ("lantern", "whisper", "journey", "blanket", "harvest", "puzzle", "courage", "thunder",
         "pocket", "mirror", "kettle", "marble", "orchard", "ladder", "compass", "feather",
         "window", "garden", "blossom", "candle", "anchor", "basket", "bridge", "cabinet",
         "castle", "circus", "curtain", "diamond", "engine", "fountain", "glove", "hammer",
         "helmet", "jacket", "jungle", "kingdom", "lemonade", "magnet", "meadow", "needle",
         "notebook", "ocean", "paddle", "parade", "pillow", "planet", "pyramid", "rocket",
         "saddle", "shadow", "silver", "spider", "sponge", "statue", "sweater", "ticket",
         "tunnel", "umbrella", "valley", "village", "wagon", "wallet", "wizard", "yellow",
         "breakfast", "cinnamon", "dinosaur", "envelope", "festival", "gravel", "horizon",
         "invention", "kitchen", "library", "mountain", "neighbor", "passport", "question",
         "rhythm", "sandwich", "telephone", "universe", "vacation", "weather", "adventure",
         "balance", "chimney", "dolphin", "elbow", "friendship", "guitar", "history", "iceberg",
         "jewel", "knowledge", "lighthouse", "memory", "nature", "orange", "patience", "quilt",
         "rainbow", "silence", "treasure", "uniform", "victory", "waterfall", "yesterday")
CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Sydney", "Toronto",
          "Chicago", "Boston", "Seattle", "Dublin", "Vienna", "Prague", "Lisbon", "Athens",
          "Istanbul", "Moscow", "Beijing", "Shanghai", "Mumbai", "Delhi", "Bangkok", "Singapore",
          "Seoul", "Nairobi", "Lagos", "Lima", "Havana", "Montreal", "Vancouver", "Oslo",
          "Stockholm", "Helsinki", "Copenhagen", "Amsterdam", "Brussels", "Warsaw", "Budapest",
          "Venice", "Florence", "Barcelona", "Munich", "Zurich", "Geneva", "Edinburgh",
          "Manchester", "Kyoto", "Osaka", "Hanoi", "Jakarta", "Manila", "Dubai", "Marrakesh",
          "Casablanca", "Santiago", "Quito", "Melbourne", "Auckland", "Cape Town", "Rio de Janeiro",
          "Buenos Aires", "New Orleans", "San Francisco", "Los Angeles", "Miami", "Naples")
SUMS = tuple((str(a), str(b)) for a, b in ((2, 3), (4, 5), (7, 1), (6, 6), (9, 3), (8, 2),
                                           (10, 5), (12, 4), (3, 3), (5, 8), (11, 2), (20, 7),
                                           (15, 5), (9, 9), (14, 6), (30, 12), (7, 7), (4, 9),
                                           (6, 3), (18, 2), (25, 5), (13, 8)))

TOPICS = (
    Topic("capital", ("What is the capital of {}?", "Which city is the capital of {}?",
                      "Name the capital city of {}.", "Tell me the capital of {}."), COUNTRIES),
    Topic("language", ("What language is spoken in {}?", "What is the official language of {}?",
                       "Which language do people speak in {}?", "What do people in {} speak?"),
          COUNTRIES),
    Topic("colour", ("What colour is {}?", "What color is {}?", "Which colour is {} usually?",
                     "Describe the colour of {}."), THINGS),
    Topic("animal", ("What sound does a {} make?", "What does a {} eat?", "Where does a {} live?",
                     "Tell me one fact about the {}."), ANIMALS),
    Topic("how-to", ("How do I {}?", "How can I {}?", "What is the best way to {}?",
                     "Explain how to {}."), TASKS),
    Topic("why", ("Why is {0} {1}?", "What makes {0} {1}?", "Explain why {0} is {1}.",
                  "Can you tell me why {0} is {1}?"), WHY),
    Topic("definition", ("What is {}?", "Define {}.", "Explain {} in simple words.",
                         "What does the word {} mean?"), CONCEPTS),
    Topic("opposite", ("What is the opposite of {}?", "Give me an antonym of {}.",
                       "Which word means the opposite of {}?", "What word is the reverse of {}?"),
          ADJECTIVES),
    Topic("author", ("Who wrote {}?", "Who is the author of {}?", "Which writer created {}?",
                     "Tell me who wrote {}."), BOOKS),
    Topic("made-of", ("What is {} made of?", "What are the ingredients of {}?", "How is {} made?",
                      "What goes into {}?"), MATERIALS),
    Topic("place", ("Where is {}?", "In which country is {}?", "Where can I find {}?",
                    "Which continent is {} in?"), LANDMARKS),
    Topic("describe", ("Describe {} in one sentence.", "What is {} like?", "Tell me about {}.",
                       "Write one sentence about {}."), SCENES),
    Topic("arithmetic", ("What is {0} plus {1}?", "What is {0} times {1}?", "Add {0} and {1}.",
                         "How much is {0} minus {1}?"), SUMS),
    Topic("sentence", ("Use the word {} in a sentence.", "Write a sentence with the word {}.",
                       "Give me an example sentence using the word {}.",
                       "Make up a sentence that contains the word {}."), WORDS),
    Topic("city", ("Tell me about the city of {}.", "What is {} famous for?",
                   "Where is the city of {}?", "What is special about {}?"), CITIES),
)
HELD_OUT_SLOT_EVERY = 4  # one slot word in four, by hash, never seen in training


def _held_out(part: str) -> bool:
    # A hash: the same answer across runs and Python versions.
    return int(hashlib.sha256(part.encode()).hexdigest(), 16) % HELD_OUT_SLOT_EVERY == 0


def _parts(slot: str | tuple[str, ...]) -> tuple[str, ...]:
    return slot if isinstance(slot, tuple) else (slot,)


def held_out_slot(slot: str | tuple[str, ...]) -> bool:
    """Every part of `slot` is held out ("the sky" and "blue" of `Why is the sky blue?`)."""
    return all(map(_held_out, _parts(slot)))


def training_slot(slot: str | tuple[str, ...]) -> bool:
    """No part of `slot` is held out (slots with some of each are used nowhere)."""
    return not any(map(_held_out, _parts(slot)))


def held_out_questions() -> list[str]:
    """Every held-out phrasing filled with every held-out slot of its topic, in topic order."""
    return [t.fill(t.templates[-1], s) for t in TOPICS for s in t.slots if held_out_slot(s)]


def training_pool() -> list[tuple[str, str]]:
    """(topic, question) for every training phrasing with every training slot."""
    return [(t.name, t.fill(tpl, s)) for t in TOPICS for tpl in t.templates[:-1] for s in t.slots
            if training_slot(s)]


def split(n_train: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n_train` distinct training questions drawn with `seed` (as evenly over topics as the pool
    allows), and the held-out questions."""
    pool = training_pool()
    rng = random.Random(seed)
    by_topic: dict[str, list[str]] = {}
    for topic, q in pool:
        by_topic.setdefault(topic, []).append(q)
    for qs in by_topic.values():
        rng.shuffle(qs)
    # Round-robin over topics so that a small n_train still covers every topic.
    picked: list[str] = []
    while len(picked) < min(n_train, len(pool)):
        for qs in by_topic.values():
            if qs and len(picked) < n_train:
                picked.append(qs.pop())
    return picked, held_out_questions()
