"""The inputs every server is sent: fixed, seeded, identical for all.

``digit_images`` are scikit-learn's bundled 8x8 digits (raw intensities
0-16), in a seeded order. ``sentences`` are seeded sentences of 5-40 words
drawn from a fixed vocabulary: their lengths vary as real text does, which is
what makes padding a batch to its longest sentence cost something.
"""

from __future__ import annotations

import random

SEED = 20240611
SENTENCE_WORDS = (5, 40)

_VOCABULARY = """
the of and to in is was for on that with as by at from his her they this had not are but one
all were we when there can an which their said if do will each about how up out them then
she many some so these would other into has more two like him see time could no make than
first been its who now people my made over did down only way find use may water long little
very after words called just where most know get through back much before go good new write
our used me man too any day same right look think also around another came come work three
word must because does part even place well such here take why things help put years
different away again off went old number great tell men say small every found still between
name should home big give air line set own under read last never us left end along while
might next sound below saw something thought both few those always looked show large often
together asked house world going want school important until form food keep children feet
land side without boy once animals life enough took sometimes four head above kind began
almost live page got earth need far hand high year mother light parts country father let
night following picture being study second eyes soon times story boys since white days ever
paper hard near sentence better best across during today others however sure means knew its
try told young miles sun ways thing whole hear example heard several change answer room sea
against top turned learn point city play toward five using himself usually money seen car
"""
_WORDS = _VOCABULARY.split()


def sentences(count: int, seed: int = SEED) -> list[str]:
    """``count`` sentences of 5-40 words, the same for the same seed."""
    draw = random.Random(seed)
    low, high = SENTENCE_WORDS
    result = []
    for _ in range(count):
        words = [draw.choice(_WORDS) for _ in range(draw.randint(low, high))]
        result.append(" ".join(words).capitalize() + ".")
    return result


def digit_images(count: int, seed: int = SEED) -> list[list[int]]:
    """``count`` 8x8 digit images as 64 raw intensities, in a seeded order."""
    from sklearn.datasets import load_digits

    data = load_digits().data
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return [[int(v) for v in data[i]] for i in order[:count]]
