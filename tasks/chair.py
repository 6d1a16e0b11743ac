"""
CHAIR (Rohrbach et al. 2018; LisaAnne/Hallucination utils/chair.py and data/synonyms.txt): the objects
a caption mentions, read through a synonym list, against the image's true objects. CHAIR_S is the share
of captions with a hallucinated object, CHAIR_I the share of mentioned objects that are hallucinated.
The original's COCO synonym list and rules are built in (synonyms_path=coco).
"""
import itertools
import os
import re

from data import DataError, read_text


CHAIR_PROMPT = "Describe the image in detail."


_IRREGULAR = dict(people="person", children="child", mice="mouse", geese="goose", feet="foot", teeth="tooth",
                  oxen="ox", dice="die", lice="louse", cacti="cactus", fungi="fungus")


# The original chair.py's rules for COCO, applied when the synonym list has COCO's objects (see
# coco_rules): a qualifier and an animal or a vehicle is that animal or vehicle only ('baby bird' is a
# bird, not a person and a bird; 'passenger train' is a train), 'toilet seat' is a toilet, and 'seat'
# is no chair in a caption that mentions a toilet ("the seat of the toilet").
_COCO_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")


COCO_PHRASES = {**{(q, a): a for q in ("baby", "adult") for a in _COCO_ANIMALS},
                ("passenger", "jet"): "jet", ("passenger", "train"): "train", ("toilet", "seat"): "toilet"}


def coco_rules(synonyms):
    """Whether a synonym table is COCO's (it names the objects the COCO rules are about)."""
    return {"person", "chair", "toilet", "train", "dog"} <= set(synonyms.values())


def chair_words(text):
    """Lower-case word tokens: letters and digits ('teddy-bear' -> teddy, bear)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def parse_synonyms(lines, src="synonyms"):
    """
    CHAIR's synonyms.txt: one object a line, comma-separated names, the first the canonical one
    ('dog, puppy, hot dog' is not allowed: one name under two objects is an error, naming the lines),
    multi-word names allowed ('traffic light, stop light'). lines: the lines or the whole text.
    -> {tuple of words: canonical name}.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    table, line_of = {}, {}
    for lineno, line in enumerate(lines, 1):
        names = [" ".join(chair_words(n)) for n in line.split(",")]
        names = [n for n in names if n]
        for name in names:
            key = tuple(name.split())
            if key in table and table[key] != names[0]:
                raise ValueError(f"{src}: line {lineno}: {name!r} is already a name of {table[key]!r} "
                                 f"(line {line_of[key]})")
            table[key], line_of[key] = names[0], line_of.get(key, lineno)
    if not table:
        raise ValueError(f"{src}: no objects")
    return table


def read_synonyms(path):
    """A CHAIR synonym file, or 'coco': the original CHAIR's list of COCO's 80 objects (COCO_SYNONYMS)."""
    if path == "coco":
        return parse_synonyms(COCO_SYNONYMS, "COCO_SYNONYMS")
    if not os.path.isfile(path):
        raise DataError(f"{path}: synonym file not found (CHAIR needs one: 'canonical, synonym, ...' lines)",
                        "missing file")
    try:
        return parse_synonyms(read_text(path), path)
    except DataError:
        raise
    except ValueError as e:
        raise DataError(str(e), "malformed record") from None


def _singulars(word):
    """The word, then its possible singulars, most specific first: irregular plurals (people, mice,
    ...), -men -> -man (men, women, policemen), -ves -> -f / -fe (calves, knives), -ies -> -y, -es,
    -s. The original CHAIR uses pattern.en's singularize; these rules cover the plurals of COCO's
    object names and their synonyms."""
    out = [word]
    if word in _IRREGULAR:
        out.append(_IRREGULAR[word])
    if word.endswith("men"):
        out.append(word[:-3] + "man")
    if word.endswith("ves") and len(word) > 4:
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return out


def chair_objects(caption, synonyms, coco=None):
    """
    The canonical objects a caption mentions, one entry per mention, in order. Scanning left to
    right, the longest name wins ('hot dog' is not a 'dog', 'teddy bears' is one 'teddy bear'); a
    name's words may be plural ('boxes', 'teddy bears'). Like the original, a mention is a
    mention whatever the sentence says about it: 'there is no dog' mentions a dog. coco: apply the
    original's COCO rules (COCO_PHRASES, 'seat' beside 'toilet'); None = when coco_rules(synonyms).
    """
    coco = coco_rules(synonyms) if coco is None else coco
    words = chair_words(caption)
    longest = max(len(k) for k in synonyms)
    found, i = [], 0  # (canonical name, the name it was read as)
    while i < len(words):
        if coco and i + 1 < len(words):
            as_word = next((COCO_PHRASES[a, b] for a in _singulars(words[i]) for b in _singulars(words[i + 1])
                            if (a, b) in COCO_PHRASES), None)
            if as_word is not None:  # both words are read as this one; it may be no object ('baby animal')
                if (as_word,) in synonyms:
                    found.append((synonyms[as_word,], (as_word,)))
                i += 2
                continue
        for n in range(min(longest, len(words) - i), 0, -1):
            key = next((k for k in itertools.product(*map(_singulars, words[i:i + n])) if k in synonyms), None)
            if key is not None:
                found.append((synonyms[key], key))
                i += n
                break
        else:
            i += 1
    if coco and any("toilet" in _singulars(w) for w in words):
        found = [(o, key) for o, key in found if key != ("seat",)]
    return [o for o, _ in found]


def canonical_objects(objects, synonyms):
    """True-object names -> canonical names (a synonym or plural becomes its object; unknown names
    are kept, lower-cased)."""
    out = set()
    for o in objects:
        hit = chair_objects(o, synonyms)
        out.add(hit[0] if len(hit) == 1 else " ".join(chair_words(o)))
    return out


def chair_metrics(captions, true_objects_list, synonyms):
    """
    CHAIR over captions with their images' true objects (as the original compute_chair):
      chair_s  share of captions mentioning at least one object not in the image
      chair_i  hallucinated mentions / all object mentions (every mention counts, repeats too)
      recall   true objects mentioned / true objects (each object once per image)
      avg_len  words per caption (split on whitespace)
    Where the original divides by zero (no mentions, no true objects), the figure is 0.0.
    """
    if len(captions) != len(true_objects_list) or not captions:
        raise ValueError(f"chair_metrics: {len(captions)} captions for {len(true_objects_list)} object lists")
    hallucinating = mentions = hallucinated = recalled = n_true = words = 0
    for caption, objects in zip(captions, true_objects_list):
        truth = canonical_objects(objects, synonyms)
        said = chair_objects(caption, synonyms)
        bad = [o for o in said if o not in truth]
        hallucinating += bool(bad)
        mentions += len(said)
        hallucinated += len(bad)
        recalled += len(truth & set(said))
        n_true += len(truth)
        words += len(caption.split())
    n = len(captions)
    return dict(chair_s=hallucinating / n, chair_i=hallucinated / mentions if mentions else 0.0,
                recall=recalled / n_true if n_true else 0.0, avg_len=words / n, n=n)


# CHAIR's synonyms for COCO's 80 objects, as the original ships them (LisaAnne/Hallucination,
# data/synonyms.txt; its odd entries too: 'knive', 'phon', 'televison' are what its singularizer
# makes of words): read_synonyms('coco'), evaluate.py --synonyms_path=coco
COCO_SYNONYMS = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison 
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""
